"""An emulated home cluster on one Linux machine: namespaces, a bridge, shaped links and cgroups.

Layout (``<p>`` = the testbed's link prefix, ``hrtb`` + 6 hex digits of the name's hash)::

    host netns                bridge netns homering-testbed-NAME           device netns homering-testbed-NAME.DEV
    <p>-h  .254  ──veth──  <p>-hb ─┐
                                   bridge <p>-br  .1
                           <p>-d0 ─┘  ──veth──  <p>-e0  .2   (tc on both ends: netem, or tbf)
                           <p>-d1 ─┘  ──veth──  <p>-e1  .3   …

Every device also gets cgroups (memory, CPU quota, optional disk read throttle)
named ``homering-testbed-NAME/DEV`` under this process's own cgroup, in the
cgroup v1 hierarchies that hold those controllers, or in cgroup v2.

Processes join a device with :meth:`Testbed.spawn`: cgroups first, then the
network namespace (``setns`` in the child, not ``ip netns exec``: that
remounts ``/sys`` and so hides ``/sys/fs/cgroup``, where the agent's profiler
reads its memory limit).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import json
import logging
import os
import posixpath
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from homering.errors import HomeringError
from homering.testbed.spec import NAME_RE, DeviceSpec, TestbedSpec

log = logging.getLogger("homering.testbed")

PREFIX = "homering-testbed-"
"""Network namespaces and cgroups of every testbed start with this."""
LINK_PREFIX = "hrtb"
"""Links start with this and 6 hex digits of the testbed name's hash (names are at most 15 characters)."""
BROKER_PORT = 1883
NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
V1_CONTROLLERS = frozenset({"memory", "cpu", "cpuacct", "blkio", "cpuset", "pids", "devices", "freezer",
                            "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "misc"})

_NAME = re.compile(NAME_RE)
_LINK = re.compile(rf"^{LINK_PREFIX}[0-9a-f]{{6}}-")
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


# ---------------------------------------------------------------- names
def bridge_netns(name: str) -> str:
    """The bridge namespace of testbed ``name``: ``homering-testbed-NAME``."""
    return PREFIX + name


def device_netns(name: str, device: str) -> str:
    """A device's namespace: ``homering-testbed-NAME.DEVICE``."""
    return f"{PREFIX}{name}.{device}"


def link_prefix(name: str) -> str:
    """``hrtb`` + 6 hex digits of sha1(name) + ``-``: 11 characters, 4 left for the role."""
    return f"{LINK_PREFIX}{hashlib.sha1(name.encode()).hexdigest()[:6]}-"


def _testbed_of_netns(ns: str) -> str | None:
    """The testbed name of a homering netns (bridge or device), else None."""
    if not ns.startswith(PREFIX):
        return None
    name = ns[len(PREFIX):].split(".", 1)[0]
    return name if _NAME.match(name) else None


def _testbed_of_cgroup(dirname: str) -> str | None:
    if not dirname.startswith(PREFIX):
        return None
    name = dirname[len(PREFIX):]
    return name if _NAME.match(name) else None


def require_root() -> None:
    """Raise HomeringError unless this is Linux, we are root and iproute2 is there."""
    if sys.platform != "linux" or os.geteuid() != 0:
        raise HomeringError("testbed needs root on Linux")
    for tool in ("ip", "tc"):
        if _which(tool) is None:
            raise HomeringError(f"testbed needs iproute2's `{tool}` (apt install iproute2)")


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next((p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.access(p, os.X_OK)),
                                      None)


# ---------------------------------------------------------------- iproute2
def _cmd(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = _which(tool)
    if exe is None:
        raise HomeringError(f"testbed needs iproute2's `{tool}`")
    res = subprocess.run([exe, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise HomeringError(f"`{tool} {' '.join(args)}` failed: {(res.stderr or res.stdout).strip()}")
    return res


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _cmd("ip", *args, check=check)


def _tc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _cmd("tc", *args, check=check)


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    res = _ip("netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> set[int]:
    res = _ip("netns", "pids", ns, check=False)
    return {int(p) for p in res.stdout.split() if p.isdigit()}


def host_links() -> list[str]:
    """Link names in this process's network namespace."""
    res = _ip("-o", "link", "show", check=False)
    names = []
    for line in res.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _host_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks in use in this namespace: the routes of every table and the local addresses."""
    nets = []
    routes = _ip("-j", "-4", "route", "show", "table", "all", check=False).stdout
    addrs = _ip("-j", "-4", "addr", "show", check=False).stdout
    try:
        tokens = [r.get("dst") for r in json.loads(routes or "[]")]
        tokens += [f"{a['local']}/{a.get('prefixlen', 32)}" for link in json.loads(addrs or "[]")
                   for a in link.get("addr_info", []) if a.get("local")]
    except (ValueError, TypeError, AttributeError):
        tokens = []
    for token in tokens:
        if not token or token == "default":
            continue
        try:
            nets.append(ipaddress.IPv4Network(token, strict=False))
        except ValueError:
            continue
    return nets


def _overlaps(net: ipaddress.IPv4Network, used: list[ipaddress.IPv4Network]) -> bool:
    # a route wider than /16 (10.0.0.0/8 towards a VPN, say) is only shadowed by our /24, not a clash
    return any(net.overlaps(u) for u in used if u.prefixlen >= 16)


def pick_subnet(name: str) -> ipaddress.IPv4Network:
    """A /24 in 10.x that no route or address of this host overlaps (first try: from the name's hash)."""
    used = _host_networks()
    h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
    for i in range(100 * 256):
        second = 100 + ((h >> 8) + i // 256) % 100   # 10.100.0.0 – 10.199.255.0
        third = (h + i) % 256
        net = ipaddress.IPv4Network(f"10.{second}.{third}.0/24")
        if not _overlaps(net, used):
            return net
    raise HomeringError("no free /24 in 10.100.0.0/16–10.199.0.0/16: give the spec a subnet")


# ---------------------------------------------------------------- cgroups
@dataclass(frozen=True)
class Hierarchy:
    """A mounted cgroup hierarchy (v1: one per controller set; v2: the unified one).

    Attributes:
        version: 1 or 2.
        mount: where it is mounted.
        root: the cgroup path that appears at ``mount`` (``/`` unless bind-mounted deeper).
        controllers: v1: the mount's controllers; v2: those in the root's ``cgroup.controllers``.
        own: this process's cgroup path in it (``/proc/self/cgroup``), or None.
    """

    version: int
    mount: Path
    root: str
    controllers: frozenset[str]
    own: str | None

    @property
    def own_dir(self) -> Path:
        """The directory of this process's cgroup (the mount point when it is not visible)."""
        own = self.own or "/"
        rel = posixpath.relpath(own, self.root) if (own + "/").startswith(self.root.rstrip("/") + "/") else "."
        return self.mount if rel == "." or rel.startswith("..") else self.mount / rel


def _unescape(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted in this mount namespace, one entry per hierarchy."""
    own: dict[frozenset[str] | None, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, ctrls, path = line.split(":", 2)
            own[None if hid == "0" else frozenset(c for c in ctrls.split(",") if c)] = path
    except OSError:
        pass
    seen: set[str] = set()
    found: list[Hierarchy] = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        sb, root, mount = fields[2], _unescape(fields[3]), Path(_unescape(fields[4]))
        if rfields[0] == "cgroup":
            opts = rfields[2].split(",")
            ctrls = frozenset(o for o in opts if o in V1_CONTROLLERS or o.startswith("name="))
            h = Hierarchy(1, mount, root, ctrls, own.get(ctrls))
        else:
            try:
                ctrls = frozenset((mount / "cgroup.controllers").read_text().split())
            except OSError:
                ctrls = frozenset()
            h = Hierarchy(2, mount, root, ctrls, own.get(None))
        if sb in seen:  # the same hierarchy mounted twice: keep the first
            continue
        seen.add(sb)
        found.append(h)
    return found


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _cgroup_pids(directory: Path) -> set[int]:
    """Processes in a cgroup and all its descendants."""
    pids: set[int] = set()
    for dirpath, _dirs, files in os.walk(directory):
        if "cgroup.procs" in files:
            try:
                pids |= {int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split()}
            except (OSError, ValueError):
                pass
    return pids


def _v2_enable(directory: Path, controllers: list[str], stop: Path) -> list[str]:
    """Enable ``controllers`` for the children of ``directory`` (and, as needed, of its ancestors up to
    ``stop``). Returns those that could not be enabled."""
    try:
        enabled = set(_read(directory / "cgroup.subtree_control").split())
        available = set(_read(directory / "cgroup.controllers").split())
    except OSError:
        return list(controllers)
    missing = [c for c in controllers if c not in available]
    if missing and directory != stop and directory.parent != directory:
        _v2_enable(directory.parent, missing, stop)
        try:
            available = set(_read(directory / "cgroup.controllers").split())
        except OSError:
            pass
    failed = []
    for c in controllers:
        if c in enabled:
            continue
        if c not in available:
            failed.append(c)
            continue
        try:
            _write(directory / "cgroup.subtree_control", f"+{c}")
        except OSError:
            failed.append(c)
    return failed


def _v2_base(h: Hierarchy, controllers: list[str]) -> Path:
    """Where a testbed's v2 cgroup goes: this process's cgroup if it can delegate ``controllers``, else
    the nearest ancestor that can (cgroup v2's rule: no processes in a cgroup whose controllers are
    enabled for children). In a container whose cgroup root holds the processes, they move to a leaf
    ``homering-host`` first, as docker-in-docker does."""
    own = h.own_dir
    candidates = [own, *[p for p in own.parents if p == h.mount or h.mount in p.parents]]
    for cand in candidates:
        if not _v2_enable(cand, controllers, h.mount):
            return cand
    if own == h.mount:
        leaf = own / "homering-host"
        log.warning("cgroup v2: moving the processes of %s into %s so that %s can be enabled for "
                    "child cgroups (no internal processes)", own, leaf, "+".join(controllers))
        leaf.mkdir(exist_ok=True)
        for pid in _read(own / "cgroup.procs").split():
            try:
                _write(leaf / "cgroup.procs", pid)
            except OSError:
                pass
        if not _v2_enable(own, controllers, h.mount):
            return own
    raise HomeringError(f"cgroup v2: cannot enable {', '.join(controllers)} for child cgroups of {own} "
                        "or any parent (is the cgroup delegated to us?)")


def _rmdir_tree(directory: Path, timeout: float = 5.0) -> bool:
    """rmdir a cgroup and its children, deepest first, retrying while they drain. True if gone."""
    deadline = time.monotonic() + timeout
    while True:
        if not directory.exists():
            return True
        subdirs = sorted((Path(d) for d, _, _ in os.walk(directory)), key=lambda p: len(p.parts), reverse=True)
        busy = False
        for d in subdirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    log.warning("cannot remove cgroup %s: %s", d, exc.strerror)
                    return False
                busy = True
        if not busy:
            return not directory.exists()
        if time.monotonic() > deadline:
            log.warning("cgroup %s is still busy", directory)
            return False
        time.sleep(0.05)


def find_cgroups(names: set[str] | None = None) -> list[Path]:
    """Testbed cgroups (``homering-testbed-NAME``) anywhere in the mounted hierarchies."""
    found: list[Path] = []
    for h in hierarchies():
        if h.version == 1 and not (h.controllers & {"memory", "cpu", "blkio"}):
            continue
        for dirpath, dirs, _files in os.walk(h.mount):
            keep = []
            for d in dirs:
                tb = _testbed_of_cgroup(d)
                if tb is not None and (names is None or tb in names):
                    found.append(Path(dirpath) / d)
                else:
                    keep.append(d)
            dirs[:] = keep
    return found


CPU_PERIOD_US = 10_000
"""CFS period of the CPU quotas. Short, so that a device is slow all the time rather than fast for a
quota's worth of every period and then stopped: with the kernel's default 100 ms a 0.425-core device
runs 42.5 ms at full speed, and the profiler's median decode time sees a full-speed CPU."""


def cpu_quota(cpus: float) -> tuple[int, int]:
    """``(quota_us, period_us)`` for ``cpus`` cores: the period is :data:`CPU_PERIOD_US`, longer when
    the quota would go below the kernel's 1 ms minimum."""
    period = max(CPU_PERIOD_US, int(-(-1000 // cpus)))
    return max(1000, round(cpus * period)), period


# ---------------------------------------------------------------- disks
def block_device_of(path: Path) -> tuple[str | None, str]:
    """The ``MAJ:MIN`` to throttle for reads of files under ``path``, and a description (or why not).

    A partition maps to its whole disk (throttling works on disks, not partitions). A device-mapper
    (LVM, dm-crypt) or md device is throttled itself: blk-throttle works on bio-based devices too. A
    filesystem without a block device of its own (btrfs, overlay, tmpfs, NFS) is looked up through
    its mount source.
    """
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    if major == 0:
        source = fstype = None
        best = -1
        real = os.path.realpath(path)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            mp = _unescape(left.split()[4])
            if (real + "/").startswith(mp.rstrip("/") + "/") and len(mp) > best:
                best, fstype, source = len(mp), right.split()[0], right.split()[1]
        if not source or not source.startswith("/dev/"):
            return None, f"{path} is on {fstype or 'a filesystem'} ({source}), not on a block device"
        try:
            rdev = os.stat(source).st_rdev
        except OSError:
            return None, f"{path} is on {fstype} from {source}, which cannot be found"
        major, minor = os.major(rdev), os.minor(rdev)
    sysdir = Path(f"/sys/dev/block/{major}:{minor}")
    if not sysdir.exists():
        return None, f"{path} is on device {major}:{minor}, which is not a block device"
    real = sysdir.resolve()
    if (real / "partition").exists():
        real = real.parent
        try:
            major_minor = _read(real / "dev")
        except OSError:
            return None, f"cannot find the disk of partition {major}:{minor}"
    else:
        major_minor = f"{major}:{minor}"
    return major_minor, real.name


# ---------------------------------------------------------------- processes
def _alive(pid: int, children: dict[int, subprocess.Popen]) -> bool:
    if pid in children:
        return children[pid].poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _comm(pid: int) -> str:
    try:
        return _read(Path(f"/proc/{pid}/comm"))
    except OSError:
        return "?"


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def terminate(find_pids, grace: float = 5.0, children: dict[int, subprocess.Popen] | None = None) -> list[str]:
    """SIGTERM what ``find_pids()`` returns, SIGKILL what is left after ``grace`` s; repeat for late forks.

    Returns ``"process PID (comm)"`` for each process it signalled.
    """
    children = children or {}
    me = {os.getpid(), os.getppid()}
    done: list[str] = []
    signalled: set[int] = set()
    for _ in range(5):
        pids = {p for p in find_pids() if p not in me and _alive(p, children)}
        if not pids:
            break
        done += [f"process {p} ({_comm(p)})" for p in sorted(pids - signalled)]
        signalled |= pids
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = {p for p in pids if _alive(p, children)}
        _signal_all(pids, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = {p for p in pids if _alive(p, children)}
    for pid in signalled & children.keys():  # reap our own children
        try:
            children[pid].wait(1.0)
        except subprocess.TimeoutExpired:
            pass
    return done


# ---------------------------------------------------------------- teardown
def _remove(*, netns: list[str], links: list[str], cgroups: list[Path], grace: float,
            children: dict[int, subprocess.Popen] | None = None, last: frozenset[int] = frozenset()) -> list[str]:
    """Kill the processes of the given namespaces and cgroups, then delete them; never raises.

    ``last``: processes of the bridge namespace to stop after the devices' (the broker; a mosquitto
    is recognised by its name).
    """
    removed: list[str] = []
    device_ns = [n for n in netns if "." in n]
    bridge_ns = [n for n in netns if "." not in n]

    def device_pids() -> set[int]:
        pids: set[int] = set()
        for cg in cgroups:
            pids |= _cgroup_pids(cg)
        for ns in device_ns:
            pids |= netns_pids(ns)
        return pids

    def bridge_pids() -> set[int]:
        pids: set[int] = set()
        for ns in bridge_ns:
            pids |= netns_pids(ns)
        return pids

    def brokers() -> set[int]:
        return {p for p in bridge_pids() if p in last or _comm(p) == "mosquitto"}

    # the controller first (else it logs every agent leaving), then the agents (they can still tell
    # the broker they are leaving), the broker last
    removed += terminate(lambda: bridge_pids() - brokers(), grace, children)
    removed += terminate(device_pids, grace, children)
    removed += terminate(bridge_pids, grace, children)
    present = set(host_links())
    for link in links:
        if link in present:
            res = _ip("link", "del", link, check=False)
            if res.returncode == 0:
                removed.append(f"link {link}")
            else:
                log.warning("cannot delete link %s: %s", link, res.stderr.strip())
    existing = set(list_netns())
    for ns in device_ns + bridge_ns:
        if ns in existing:
            res = _ip("netns", "del", ns, check=False)
            if res.returncode == 0:
                removed.append(f"netns {ns}")
            else:
                log.warning("cannot delete netns %s: %s", ns, res.stderr.strip())
    for cg in cgroups:
        if cg.exists():
            if _rmdir_tree(cg):
                removed.append(f"cgroup {cg}")
    return removed


def down_all(names: set[str] | list[str] | None = None, *, grace: float = 5.0, quiet: bool = False) -> list[str]:
    """Remove what any homering testbed left behind (or only those called ``names``): processes in
    their namespaces and cgroups, then the namespaces, host links and cgroups, found by prefix, and
    the state files under ``<home>/testbeds``.

    Idempotent; never raises for an item that is already gone. Returns what it removed (and logs it
    unless ``quiet``).
    """
    require_root()
    names = set(names) if names is not None else None
    netns = [ns for ns in list_netns()
             if (tb := _testbed_of_netns(ns)) is not None and (names is None or tb in names)]
    prefixes = {link_prefix(n) for n in names} if names is not None else None
    links = [link for link in host_links()
             if _LINK.match(link) and (prefixes is None or link[:len(LINK_PREFIX) + 7] in prefixes)]
    cgroups = find_cgroups(names)
    removed = _remove(netns=netns, links=links, cgroups=cgroups, grace=grace)
    try:
        from homering import paths

        for state in (paths.home() / "testbeds").glob("*/state.json"):
            if names is None or state.parent.name in names:
                state.unlink(missing_ok=True)
                removed.append(f"state {state}")
    except OSError:
        pass
    if not quiet:
        for item in removed:
            log.info("removed %s", item)
    return removed


# ---------------------------------------------------------------- the testbed
@dataclass
class _Device:
    spec: DeviceSpec
    index: int
    address: str
    netns: str
    cgroups: list[Path]       # this device's directory in every hierarchy used
    home: Path
    shaping: str = "none"
    disk: str = "-"


def default_workdir(spec) -> Path:
    """Where a testbed keeps its files by default: ``<HOMERING_HOME>/testbeds/<name>``."""
    from homering import paths

    return paths.home() / "testbeds" / spec.name


class Testbed:
    """An emulated home cluster: one network namespace and one set of cgroups per device.

    A context manager: ``with Testbed(spec, workdir=…) as tb:`` brings it up (if not yet) and takes it
    down on exit, errors and Ctrl-C included. ``tb.shaping`` says how links are shaped: ``"netem"``,
    ``"tbf"`` (the kernel lacks sch_netem: rate only, no delay/jitter) or ``"none"``.
    """

    __test__ = False  # not a pytest class

    def __init__(self, spec: TestbedSpec, *, workdir: Path, grace: float = 5.0):
        self.spec = spec
        self.name = spec.name
        self.workdir = Path(workdir).resolve()
        self.grace = grace
        self.shaping = "none"
        self.warnings: list[str] = []
        self.subnet: ipaddress.IPv4Network | None = None
        self._devices: dict[str, _Device] = {}
        self._netns: list[str] = []
        self._links: list[str] = []
        self._cgroup_roots: list[Path] = []
        self._children: dict[int, subprocess.Popen] = {}
        self._broker: subprocess.Popen | None = None
        self._broker_port = BROKER_PORT
        self._up = False
        self._lp = link_prefix(self.name)

    # ------------------------------------------------------------ queries
    @property
    def devices(self) -> list[str]:
        """Device names, in spec order."""
        return [d.name for d in self.spec.devices]

    @property
    def bridge_address(self) -> str:
        """The bridge namespace's address (.1): the broker and the controller live there."""
        return str(self._subnet()[1])

    @property
    def host_address(self) -> str:
        """This host's address on the testbed network (the last one of the subnet)."""
        return str(self._subnet()[-2])

    @property
    def broker_url(self) -> str:
        """``mqtt://<bridge address>:1883``: reachable from the host and every device."""
        return f"mqtt://{self.bridge_address}:{self._broker_port}"

    @property
    def bridge_netns(self) -> str:
        return bridge_netns(self.name)

    def address(self, device: str | None) -> str:
        """A device's address (None: the bridge namespace's)."""
        if device is None:
            return self.bridge_address
        return self._device(device).address

    def netns(self, device: str | None) -> str:
        """The network namespace of a device (None: the bridge's)."""
        return self.bridge_netns if device is None else self._device(device).netns

    def home(self, device: str) -> Path:
        """The device's ``HOMERING_HOME``: ``<workdir>/devices/<name>/home``."""
        return self._device(device).home

    def describe(self, device: str) -> dict:
        """What the device got: address, RAM limit, CPUs, disk throttle and link shaping."""
        d = self._device(device)
        return {"name": d.spec.name, "address": d.address, "ram": d.spec.ram, "cpus": d.spec.cpus,
                "disk": d.disk, "shaping": d.shaping, "netns": d.netns, "cgroups": [str(c) for c in d.cgroups]}

    def _device(self, device: str) -> _Device:
        if not self._devices:
            raise HomeringError(f"testbed {self.name!r} is not up")
        try:
            return self._devices[device]
        except KeyError:
            raise HomeringError(f"testbed {self.name!r} has no device {device!r}") from None

    def _subnet(self) -> ipaddress.IPv4Network:
        if self.subnet is None:
            raise HomeringError(f"testbed {self.name!r} is not up")
        return self.subnet

    def _memory_dir(self, device: str) -> tuple[int, Path]:
        for cg in self._device(device).cgroups:
            if (cg / "memory.limit_in_bytes").exists():
                return 1, cg
            if (cg / "memory.max").exists():
                return 2, cg
        raise HomeringError(f"device {device!r} has no memory cgroup")

    def memory_usage(self, device: str) -> int:
        """Bytes charged to the device now, page cache included."""
        v, cg = self._memory_dir(device)
        return int(_read(cg / ("memory.usage_in_bytes" if v == 1 else "memory.current")))

    def memory_limit(self, device: str) -> int:
        """The device's memory limit in bytes."""
        v, cg = self._memory_dir(device)
        text = _read(cg / ("memory.limit_in_bytes" if v == 1 else "memory.max"))
        return (1 << 63) - 1 if text == "max" else int(text)

    def memory_peak(self, device: str) -> int | None:
        """The most bytes ever charged to the device (None when the kernel does not say: v2 before 5.19)."""
        v, cg = self._memory_dir(device)
        f = cg / ("memory.max_usage_in_bytes" if v == 1 else "memory.peak")
        return int(_read(f)) if f.exists() else None

    def oom_kills(self, device: str) -> int:
        """Processes the kernel's OOM killer killed in the device (its cgroup's ``oom_kill`` count)."""
        v, cg = self._memory_dir(device)
        text = _read(cg / ("memory.oom_control" if v == 1 else "memory.events"))
        m = re.search(r"^oom_kill (\d+)$", text, re.M)
        return int(m.group(1)) if m else 0

    def pids(self, device: str | None) -> list[int]:
        """Processes in a device (its cgroups and namespace), or in the bridge namespace for None."""
        if device is None:
            return sorted(netns_pids(self.bridge_netns))
        d = self._device(device)
        pids = netns_pids(d.netns)
        for cg in d.cgroups:
            pids |= _cgroup_pids(cg)
        return sorted(pids)

    # ------------------------------------------------------------ up
    def __enter__(self) -> "Testbed":
        if not self._up:
            self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> "Testbed":
        """Create the namespaces, bridge, links, shaping and cgroups; returns self.

        Raises:
            HomeringError: not root on Linux, leftovers of a testbed with this name, no memory
                cgroup controller, or an ``ip``/``tc`` command that failed. Whatever was created
                is removed again.
        """
        require_root()
        if self._up:
            return self
        self._check_leftovers()
        try:
            self._up = True
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "logs").mkdir(exist_ok=True)
            for old in (self.workdir / "logs").glob("*.log"):  # a previous run's
                old.unlink()
            self.subnet = self._choose_subnet()
            self._make_network()
            try:
                self._make_cgroups()
            except OSError as exc:
                raise HomeringError(f"cannot set up the cgroups of testbed {self.name!r}: "
                                    f"{exc.strerror or exc} ({exc.filename or ''})") from None
            self._save()
        except BaseException:
            self.down()
            raise
        log.info("testbed %s is up: %d devices on %s, shaping %s", self.name, len(self._devices), self.subnet,
                 self.shaping)
        return self

    def _check_leftovers(self) -> None:
        mine = [ns for ns in list_netns() if _testbed_of_netns(ns) == self.name]
        mine += [link for link in host_links() if link.startswith(self._lp)]
        mine += [str(p) for p in find_cgroups({self.name})]
        if mine:
            raise HomeringError(f"testbed {self.name!r} is already up or left over ({', '.join(mine[:3])}"
                                f"{', …' if len(mine) > 3 else ''}): run `homering testbed down`")

    def _choose_subnet(self) -> ipaddress.IPv4Network:
        if self.spec.subnet is None:
            return pick_subnet(self.name)
        net = ipaddress.IPv4Network(self.spec.subnet)
        clash = [u for u in _host_networks() if u.prefixlen >= 16 and net.overlaps(u)]
        if clash:
            raise HomeringError(f"subnet {net} of testbed {self.name!r} overlaps {clash[0]} on this host")
        return net

    def _make_network(self) -> None:
        net = self._subnet()
        plen = net.prefixlen
        br, lp = self.bridge_netns, self._lp
        self._netns.append(br)
        _ip("netns", "add", br)
        _ip("-n", br, "link", "set", "lo", "up")
        _ip("-n", br, "link", "add", f"{lp}br", "type", "bridge")
        _ip("-n", br, "addr", "add", f"{self.bridge_address}/{plen}", "dev", f"{lp}br")
        _ip("-n", br, "link", "set", f"{lp}br", "up")
        # the host's leg: a veth whose other end is a bridge port
        self._links.append(f"{lp}h")
        _ip("link", "add", f"{lp}h", "type", "veth", "peer", "name", f"{lp}hb", "netns", br)
        _ip("-n", br, "link", "set", f"{lp}hb", "master", f"{lp}br", "up")
        _ip("addr", "add", f"{self.host_address}/{plen}", "dev", f"{lp}h")
        _ip("link", "set", f"{lp}h", "up")
        for i, spec in enumerate(self.spec.devices):
            ns = device_netns(self.name, spec.name)
            home = self.workdir / "devices" / spec.name / "home"
            home.mkdir(parents=True, exist_ok=True)
            dev = _Device(spec, i, str(net[i + 2]), ns, [], home)
            self._devices[spec.name] = dev
            self._netns.append(ns)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            outer, inner = f"{lp}d{i}", f"{lp}e{i}"
            _ip("link", "add", outer, "netns", br, "type", "veth", "peer", "name", inner, "netns", ns)
            _ip("-n", br, "link", "set", outer, "master", f"{lp}br", "up")
            _ip("-n", ns, "addr", "add", f"{dev.address}/{plen}", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            dev.shaping = self._shape(dev, [(ns, inner), (br, outer)])

    # ------------------------------------------------------------ shaping
    def _shape(self, dev: _Device, ends: list[tuple[str, str]]) -> str:
        """tc on both ends of the device's veth (egress of each = one direction of the link)."""
        s = dev.spec
        if not s.wants_shaping:
            return "none"
        if self.shaping != "tbf":  # netem, or not tried yet
            args = []
            if s.wants_delay:
                args += ["delay", f"{s.delay_ms or 0:g}ms"] + ([f"{s.jitter_ms:g}ms"] if s.jitter_ms else [])
            if s.rate_mbit:
                args += ["rate", f"{s.rate_mbit:g}mbit"]
            args += ["limit", "10000"]
            res = None
            for ns, link in ends:
                res = _tc("-n", ns, "qdisc", "add", "dev", link, "root", "netem", *args, check=False)
                if res.returncode != 0:
                    break
            if res is not None and res.returncode == 0:
                self.shaping = "netem"
                parts = []
                if s.wants_delay:
                    parts.append(f"{s.delay_ms or 0:g}" + (f"±{s.jitter_ms:g}" if s.jitter_ms else "") + " ms")
                if s.rate_mbit:
                    parts.append(f"{s.rate_mbit:g} Mbit/s")
                return "netem " + ", ".join(parts)
            err = (res.stderr or res.stdout).strip() if res is not None else ""
            if "unknown" not in err.lower() and "not found" not in err.lower():
                raise HomeringError(f"cannot shape the link of {s.name} with netem: {err}")
            for ns, link in ends:  # a half-applied netem cannot exist (the first add failed), but be sure
                _tc("-n", ns, "qdisc", "del", "dev", link, "root", check=False)
            msg = ("the kernel has no sch_netem: link delay and jitter are not emulated "
                   "(tbf shapes the rate only)")
            if msg not in self.warnings:
                log.warning(msg)
                self.warnings.append(msg)
            self.shaping = "tbf"
        if not s.rate_mbit:
            return "none (no netem for the delay)"
        rate_bps = s.rate_mbit * 1e6
        burst = max(int(rate_bps / 8 * 0.002), 16 * 1514)  # 2 ms at the rate, at least 16 frames
        for ns, link in ends:
            _tc("-n", ns, "qdisc", "add", "dev", link, "root", "tbf", "rate", f"{s.rate_mbit:g}mbit",
                "burst", str(burst), "latency", "50ms")
        return f"tbf {s.rate_mbit:g} Mbit/s" + (", no delay" if s.wants_delay else "")

    # ------------------------------------------------------------ cgroups
    def _make_cgroups(self) -> None:
        hs = hierarchies()
        need_disk = any(d.disk_read_mbps for d in self.spec.devices)
        wanted = {"memory": "memory", "cpu": "cpu"} | ({"blkio": "io"} if need_disk else {})
        v1: dict[str, Hierarchy] = {}
        for key in wanted:
            h = next((h for h in hs if h.version == 1 and key in h.controllers), None)
            if h is not None:
                v1[key] = h
        unified = next((h for h in hs if h.version == 2), None)
        v2_ctrls = [wanted[k] for k in wanted if k not in v1 and unified is not None
                    and wanted[k] in unified.controllers]
        if "memory" not in v1 and "memory" not in v2_ctrls:
            raise HomeringError("no memory cgroup controller is mounted (cgroup v1 memory or v2 memory)")
        for key in wanted:
            if key not in v1 and wanted[key] not in v2_ctrls:
                msg = f"no {wanted[key]} cgroup controller: {'CPU quotas' if key == 'cpu' else 'disk throttles'} " \
                      "are not emulated"
                log.warning(msg)
                self.warnings.append(msg)
        # one testbed directory per hierarchy, the devices below it
        tb_dir = PREFIX + self.name
        layout: list[tuple[Hierarchy, Path, set[str]]] = []  # (hierarchy, testbed dir, controllers)
        for h in {id(h): h for h in v1.values()}.values():
            layout.append((h, h.own_dir / tb_dir, set(h.controllers)))
        if v2_ctrls:
            base = _v2_base(unified, v2_ctrls)
            layout.append((unified, base / tb_dir, set(v2_ctrls)))
        for h, root, ctrls in layout:
            self._cgroup_roots.append(root)
            root.mkdir()
            if h.version == 2:
                failed = _v2_enable(root, sorted(ctrls), root)
                if failed:
                    raise HomeringError(f"cgroup v2: cannot enable {', '.join(failed)} in {root}")
        disk = self._disk() if need_disk else None
        for dev in self._devices.values():
            s = dev.spec
            for h, root, ctrls in layout:
                cg = root / s.name
                cg.mkdir()
                dev.cgroups.append(cg)
                if h.version == 1:
                    self._limit_v1(dev, cg, ctrls, disk)
                else:
                    self._limit_v2(dev, cg, ctrls, disk)
            if s.disk_read_mbps and dev.disk == "-":
                dev.disk = "not throttled"

    def _disk(self) -> tuple[str | None, str]:
        try:
            majmin, what = block_device_of(self.workdir)
        except OSError as exc:
            majmin, what = None, f"cannot find the disk of {self.workdir}: {exc.strerror or exc}"
        if majmin is None:
            msg = f"disk read throttles are not emulated: {what}"
            log.warning(msg)
            self.warnings.append(msg)
        return majmin, what

    def _throttle_failed(self, dev: _Device, exc: OSError, majmin: str) -> None:
        msg = f"cannot throttle disk reads of {dev.spec.name} on {majmin}: {exc.strerror or exc}"
        log.warning(msg)
        self.warnings.append(msg)
        dev.disk = "not throttled"

    def _limit_v1(self, dev: _Device, cg: Path, ctrls: set[str], disk) -> None:
        s = dev.spec
        if "memory" in ctrls:
            _write(cg / "memory.limit_in_bytes", str(s.ram))
            if (cg / "memory.memsw.limit_in_bytes").exists():
                try:
                    _write(cg / "memory.memsw.limit_in_bytes", str(s.ram))
                except OSError as exc:
                    log.debug("memsw limit of %s: %s", s.name, exc)
            try:
                _write(cg / "memory.swappiness", "0")
            except OSError as exc:
                log.debug("swappiness of %s: %s", s.name, exc)
        if "cpu" in ctrls:
            quota, period = cpu_quota(s.cpus)
            _write(cg / "cpu.cfs_period_us", str(period))
            _write(cg / "cpu.cfs_quota_us", str(quota))
        if "blkio" in ctrls and s.disk_read_mbps and disk and disk[0]:
            bps = round(s.disk_read_mbps * 1e6)
            try:
                _write(cg / "blkio.throttle.read_bps_device", f"{disk[0]} {bps}")
                dev.disk = f"{s.disk_read_mbps:g} MB/s ({disk[1]})"
            except OSError as exc:
                self._throttle_failed(dev, exc, disk[0])

    def _limit_v2(self, dev: _Device, cg: Path, ctrls: set[str], disk) -> None:
        s = dev.spec
        if "memory" in ctrls:
            _write(cg / "memory.max", str(s.ram))
            if (cg / "memory.swap.max").exists():
                _write(cg / "memory.swap.max", "0")
        if "cpu" in ctrls:
            _write(cg / "cpu.max", "%d %d" % cpu_quota(s.cpus))
        if "io" in ctrls and s.disk_read_mbps and disk and disk[0]:
            bps = round(s.disk_read_mbps * 1e6)
            try:
                _write(cg / "io.max", f"{disk[0]} rbps={bps}")
                dev.disk = f"{s.disk_read_mbps:g} MB/s ({disk[1]})"
            except OSError as exc:
                self._throttle_failed(dev, exc, disk[0])

    # ------------------------------------------------------------ processes
    def spawn(self, device: str | None, argv: list[str], *, env: dict[str, str] | None = None,
              stdout=None, stderr=None, cwd=None, stdin=subprocess.DEVNULL) -> subprocess.Popen:
        """Run ``argv`` in a device: its cgroups, then its network namespace (None: the bridge
        namespace, no limits). ``HOMERING_HOME`` is the device's home unless ``env`` sets it.

        The child starts a new session (a Ctrl-C at the terminal reaches only this process, which
        takes the testbed down).
        """
        if not self._up:
            raise HomeringError(f"testbed {self.name!r} is not up")
        ns_path = NETNS_DIR / self.netns(device)
        procs = [cg / "cgroup.procs" for cg in self._device(device).cgroups] if device is not None else []
        child_env = dict(os.environ if env is None else env)
        if device is not None and (env is None or "HOMERING_HOME" not in env):
            child_env["HOMERING_HOME"] = str(self.home(device))
        if not ns_path.exists():
            raise HomeringError(f"network namespace {ns_path} is gone")
        libc = _libc

        def enter() -> None:  # runs in the child between fork and exec: no logging, no locks
            pid = str(os.getpid()).encode()
            for f in procs:
                fd = os.open(f, os.O_WRONLY)
                try:
                    os.write(fd, pid)
                finally:
                    os.close(fd)
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns: {os.strerror(e)}")
            finally:
                os.close(fd)

        proc = subprocess.Popen(argv, env=child_env, stdin=stdin, stdout=stdout, stderr=stderr, cwd=cwd,
                                preexec_fn=enter, start_new_session=True)
        proc.device = device  # type: ignore[attr-defined]
        self._children[proc.pid] = proc
        self._save()
        return proc

    def cut(self, device: str, cut: bool = True) -> None:
        """Cut a device off the network (its bridge-side veth down: every packet to or from it is dropped,
        as when a laptop's Wi-Fi sleeps), or reconnect it (``cut=False``). Its processes keep running."""
        i = self._device(device).index
        _ip("-n", self.bridge_netns, "link", "set", f"{self._lp}d{i}", "down" if cut else "up")

    def log_path(self, name: str) -> Path:
        """``<workdir>/logs/<name>.log``."""
        return self.workdir / "logs" / f"{name}.log"

    def spawn_logged(self, device: str | None, argv: list[str], log_name: str, **kw) -> subprocess.Popen:
        """:meth:`spawn` with stdout and stderr appended to ``<workdir>/logs/<log_name>.log``."""
        with open(self.log_path(log_name), "ab") as f:
            return self.spawn(device, argv, stdout=f, stderr=subprocess.STDOUT, **kw)

    def start_broker(self, port: int = BROKER_PORT, timeout: float = 20.0) -> str:
        """Start mosquitto (or, without it, homering's embedded amqtt broker) in the bridge namespace on
        the bridge address; wait until it accepts connections from the host. Returns :attr:`broker_url`.
        """
        from homering.transport.broker import mosquitto_binary, wait_for_port, write_mosquitto_config

        if self._broker is not None and self._broker.poll() is None:
            return self.broker_url
        self._broker_port = port
        ip = self.bridge_address
        exe = mosquitto_binary()
        if exe:
            conf = write_mosquitto_config(self.workdir, ip, port, log=True)
            argv = [exe, "-c", str(conf)]
        else:
            log.warning("mosquitto is not installed: the testbed uses homering's embedded broker (amqtt)")
            argv = [sys.executable, "-m", "homering", "broker", "--host", ip, "--port", str(port)]
        self._broker = self.spawn_logged(None, argv, "broker")
        deadline = time.monotonic() + timeout
        while not wait_for_port(ip, port, timeout=0.5):
            if self._broker.poll() is not None or time.monotonic() > deadline:
                raise HomeringError(f"the testbed's MQTT broker did not start on {ip}:{port} "
                                    f"(see {self.log_path('broker')})")
        self._save()
        return self.broker_url

    def stop_broker(self, grace: float = 5.0) -> None:
        """Stop the broker :meth:`start_broker` started (its retained messages go with it)."""
        proc, self._broker = self._broker, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ------------------------------------------------------------ state and down
    def _save(self) -> None:
        state = {
            "name": self.name, "workdir": str(self.workdir), "pid": os.getpid(), "created": time.time(),
            "subnet": str(self.subnet) if self.subnet else None,
            "bridge_address": self.bridge_address if self.subnet else None,
            "host_address": self.host_address if self.subnet else None,
            "broker_url": self.broker_url if self._broker else None,
            "shaping": self.shaping, "warnings": self.warnings,
            "netns": self._netns, "links": self._links, "cgroups": [str(c) for c in self._cgroup_roots],
            "devices": {n: self.describe(n) for n in self._devices},
            "pids": sorted(self._children),
        }
        tmp = self.workdir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.workdir / "state.json")

    def down(self) -> list[str]:
        """Stop every process of the testbed (SIGTERM, SIGKILL after the grace), delete its namespaces,
        links and cgroups and the state file. Idempotent; never raises for what is already gone.
        Returns what it removed."""
        if not self._up:
            return []
        last = frozenset({self._broker.pid} if self._broker is not None else ())
        removed = _remove(netns=self._netns, links=self._links, cgroups=self._cgroup_roots, grace=self.grace,
                          children=self._children, last=last)
        # a sweep by name, for anything created between a failure and its record
        removed += down_all({self.name}, grace=self.grace, quiet=True) if _leftovers(self.name) else []
        (self.workdir / "state.json").unlink(missing_ok=True)
        (self.workdir / "state.json.tmp").unlink(missing_ok=True)
        self._up = False
        self._broker = None
        self._children.clear()
        self._devices.clear()
        self._netns, self._links, self._cgroup_roots = [], [], []
        log.info("testbed %s is down", self.name)
        return removed


def _leftovers(name: str) -> bool:
    return (any(_testbed_of_netns(ns) == name for ns in list_netns())
            or any(link.startswith(link_prefix(name)) for link in host_links()))


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False

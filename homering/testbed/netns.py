"""The testbed's network: named network namespaces, a bridge, veth pairs and tc shaping (iproute2).

Layout (``<p>`` = the testbed's link prefix, ``hrtb`` + 6 hex digits of the name's hash)::

    host netns                bridge netns homering-testbed-NAME           device netns homering-testbed-NAME.DEV
    <p>-h  .254  ──veth──  <p>-hb ─┐
                                   bridge <p>-br  .1
                           <p>-d0 ─┘  ──veth──  <p>-e0  .2   (tc on both ends: netem, or tbf + NFQUEUE)
                           <p>-d1 ─┘  ──veth──  <p>-e1  .3   …

Names are derived from the testbed's name, so that :func:`~homering.testbed.cleanup.down_all` finds what a
crashed testbed left behind by prefix alone.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from homering.errors import HomeringError
from homering.testbed.spec import NAME_RE, DeviceSpec

log = logging.getLogger("homering.testbed")

PREFIX = "homering-testbed-"
"""Network namespaces and cgroups of every testbed start with this."""
LINK_PREFIX = "hrtb"
"""Links start with this and 6 hex digits of the testbed name's hash (names are at most 15 characters)."""
NETNS_DIR = Path("/run/netns")
"""Where ``ip netns`` keeps the named namespaces (a process joins one by opening its file)."""

NAME = re.compile(NAME_RE)
LINK = re.compile(rf"^{LINK_PREFIX}[0-9a-f]{{6}}-")
"""A testbed's host link (any testbed's)."""


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


def testbed_of_netns(ns: str) -> str | None:
    """The testbed name of a homering netns (bridge or device), else None."""
    if not ns.startswith(PREFIX):
        return None
    name = ns[len(PREFIX) :].split(".", 1)[0]
    return name if NAME.match(name) else None


# ---------------------------------------------------------------- iproute2
def which(tool: str) -> str | None:
    """The path of ``tool`` on $PATH or in /usr/sbin or /sbin (root's tools), else None."""
    return shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.access(p, os.X_OK)), None
    )


def require_root() -> None:
    """Raise HomeringError unless this is Linux, we are root and iproute2 is there."""
    if sys.platform != "linux" or os.geteuid() != 0:
        raise HomeringError("testbed needs root on Linux")
    for tool in ("ip", "tc"):
        if which(tool) is None:
            raise HomeringError(f"testbed needs iproute2's `{tool}` (apt install iproute2)")


def _cmd(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = which(tool)
    if exe is None:
        raise HomeringError(f"testbed needs iproute2's `{tool}`")
    res = subprocess.run([exe, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise HomeringError(f"`{tool} {' '.join(args)}` failed: {(res.stderr or res.stdout).strip()}")
    return res


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; with ``check``, a non-zero exit raises HomeringError with its message."""
    return _cmd("ip", *args, check=check)


def tc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``tc ARGS``; with ``check``, a non-zero exit raises HomeringError with its message."""
    return _cmd("tc", *args, check=check)


def list_netns() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    res = ip("netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def netns_pids(ns: str) -> set[int]:
    """Processes in network namespace ``ns`` (empty when it is gone)."""
    res = ip("netns", "pids", ns, check=False)
    return {int(p) for p in res.stdout.split() if p.isdigit()}


def host_links() -> list[str]:
    """Link names in this process's network namespace."""
    res = ip("-o", "link", "show", check=False)
    names = []
    for line in res.stdout.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


# ---------------------------------------------------------------- subnets
def host_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks in use in this namespace: the routes of every table and the local addresses."""
    nets = []
    routes = ip("-j", "-4", "route", "show", "table", "all", check=False).stdout
    addrs = ip("-j", "-4", "addr", "show", check=False).stdout
    try:
        tokens = [r.get("dst") for r in json.loads(routes or "[]")]
        tokens += [
            f"{a['local']}/{a.get('prefixlen', 32)}"
            for link in json.loads(addrs or "[]")
            for a in link.get("addr_info", [])
            if a.get("local")
        ]
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
    used = host_networks()
    h = int(hashlib.sha1(name.encode()).hexdigest(), 16)
    for i in range(100 * 256):
        second = 100 + ((h >> 8) + i // 256) % 100  # 10.100.0.0 – 10.199.255.0
        third = (h + i) % 256
        net = ipaddress.IPv4Network(f"10.{second}.{third}.0/24")
        if not _overlaps(net, used):
            return net
    raise HomeringError("no free /24 in 10.100.0.0/16–10.199.0.0/16: give the spec a subnet")


def choose_subnet(name: str, subnet: str | None) -> ipaddress.IPv4Network:
    """The spec's ``subnet``, checked against this host's networks, or a free one (:func:`pick_subnet`).

    Raises:
        HomeringError: the spec's subnet overlaps a network of this host.
    """
    if subnet is None:
        return pick_subnet(name)
    net = ipaddress.IPv4Network(subnet)
    clash = [u for u in host_networks() if u.prefixlen >= 16 and net.overlaps(u)]
    if clash:
        raise HomeringError(f"subnet {net} of testbed {name!r} overlaps {clash[0]} on this host")
    return net


SHAPING_SUMMARY = {
    "netem": "netem (delay, jitter and rate)",
    "nfqueue": "nfqueue delay + tbf rate (no sch_netem)",
    "tbf": "tbf rate only (no delay)",
    "none": "none",
}


def shaping_summary(shaping: str) -> str:
    """A testbed's shaping (:attr:`Network.shaping`) in words, e.g. ``"nfqueue delay + tbf rate (no sch_netem)"``."""
    return SHAPING_SUMMARY.get(shaping, shaping)


# ---------------------------------------------------------------- the testbed's network
class Network:
    """The namespaces and links of one testbed, recorded as it creates them (for the teardown to delete them).

    Attributes:
        netns: the namespaces created, the bridge's first.
        links: the host-side links created.
        delayers: the NFQUEUE delayer processes (by pid), one per device with a delay when there is no netem.
        shaping: how links are shaped: ``"netem"``, ``"nfqueue"`` (no sch_netem: delay and jitter by the
            delayers, the rate by tbf), ``"tbf"`` (rate only, no delay or jitter) or ``"none"`` (no device
            asked for shaping, or not up yet).
        log_dir: where the delayers write their logs (``delayer-DEVICE.log``).
        allow_no_delay: without netem and NFQUEUE, drop the delay (a warning) instead of raising HomeringError.
    """

    def __init__(
        self, name: str, warn: Callable[[str], None], *, log_dir: Path | None = None, allow_no_delay: bool = False
    ):
        self.name = name
        self.prefix = link_prefix(name)
        self.netns: list[str] = []
        self.links: list[str] = []
        self.delayers: dict[int, subprocess.Popen] = {}
        self.shaping = "none"
        self.log_dir = log_dir
        self.allow_no_delay = allow_no_delay
        self._netem_ok: bool | None = None  # None: not tried yet
        self._warn = warn

    @property
    def bridge_netns(self) -> str:
        """The bridge namespace's name."""
        return bridge_netns(self.name)

    def add_bridge(self, bridge_address: str, host_address: str, prefixlen: int) -> None:
        """The bridge namespace with its bridge, and the host's leg: a veth whose other end is a bridge port."""
        br, lp = self.bridge_netns, self.prefix
        self.netns.append(br)
        ip("netns", "add", br)
        ip("-n", br, "link", "set", "lo", "up")
        ip("-n", br, "link", "add", f"{lp}br", "type", "bridge")
        ip("-n", br, "addr", "add", f"{bridge_address}/{prefixlen}", "dev", f"{lp}br")
        ip("-n", br, "link", "set", f"{lp}br", "up")
        self.links.append(f"{lp}h")
        ip("link", "add", f"{lp}h", "type", "veth", "peer", "name", f"{lp}hb", "netns", br)
        ip("-n", br, "link", "set", f"{lp}hb", "master", f"{lp}br", "up")
        ip("addr", "add", f"{host_address}/{prefixlen}", "dev", f"{lp}h")
        ip("link", "set", f"{lp}h", "up")

    def add_device(self, index: int, spec: DeviceSpec, address: str, prefixlen: int) -> tuple[str, str]:
        """A device's namespace on the bridge, at ``address``, its link shaped as the spec says.

        Returns:
            (the namespace's name, how its link is shaped: e.g. ``"netem 5±1 ms, 465 Mbit/s"``).
        """
        br, lp = self.bridge_netns, self.prefix
        ns = device_netns(self.name, spec.name)
        self.netns.append(ns)
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        outer, inner = f"{lp}d{index}", f"{lp}e{index}"
        ip("link", "add", outer, "netns", br, "type", "veth", "peer", "name", inner, "netns", ns)
        ip("-n", br, "link", "set", outer, "master", f"{lp}br", "up")
        ip("-n", ns, "addr", "add", f"{address}/{prefixlen}", "dev", inner)
        ip("-n", ns, "link", "set", inner, "up")
        return ns, self._shape(spec, [(ns, inner), (br, outer)])

    def cut(self, index: int, cut: bool = True) -> None:
        """Take device ``index``'s bridge-side veth down (every packet to or from it is dropped), or up."""
        ip("-n", self.bridge_netns, "link", "set", f"{self.prefix}d{index}", "down" if cut else "up")

    def forget(self) -> None:
        """Forget what was created (after it was deleted)."""
        self.netns, self.links, self.delayers = [], [], {}

    def _shape(self, s: DeviceSpec, ends: list[tuple[str, str]]) -> str:
        """Shape the device's link: netem on both ends of its veth (the delay on the bridge's end, i.e. on the
        way to the device), else a delayer (NFQUEUE) on the device's way in and tbf on both ends for the rate
        (the egress of each end = one direction). What the delay means: :mod:`.delay`."""
        if not s.wants_shaping:
            return "none"
        if self._netem_ok is not False:
            shaped = self._netem(s, ends)
            if shaped is not None:
                return shaped
        parts = [self._delay(s, *ends[0])] if s.wants_delay else []
        if s.rate_mbit:
            self._tbf(s, ends)
            parts.append(f"tbf {s.rate_mbit:g} Mbit/s")
            self.shaping = self.shaping if self.shaping == "nfqueue" else "tbf"
        return ", ".join(parts) or "none"

    def _delay(self, s: DeviceSpec, ns: str, link: str) -> str:
        """The device's delay through NFQUEUE; without it, HomeringError unless delays may be dropped."""
        from homering.testbed import delay

        why = delay.unavailable()
        if why is None:
            log_file = self.log_dir / f"delayer-{s.name}.log" if self.log_dir else Path(os.devnull)
            proc = delay.start_delayer(NETNS_DIR / ns, link, s.delay_ms, s.jitter_ms, log_file)
            self.delayers[proc.pid] = proc
            self.shaping = "nfqueue"
            return "nfqueue " + delay.describe(s.delay_ms, s.jitter_ms)
        msg = f"no sch_netem in the kernel and {why}: link delay and jitter cannot be emulated"
        if not self.allow_no_delay:
            raise HomeringError(f"{msg} (device {s.name}: {delay.describe(s.delay_ms, s.jitter_ms)}); "
                                "allow it with --allow-no-delay")  # fmt: skip
        self._warn(msg + " (tbf shapes the rate only)")
        return "no delay"

    def _tbf(self, s: DeviceSpec, ends: list[tuple[str, str]]) -> None:
        rate_bps = (s.rate_mbit or 0) * 1e6
        burst = max(int(rate_bps / 8 * 0.002), 16 * 1514)  # 2 ms at the rate, at least 16 frames
        for ns, link in ends:
            tc("-n", ns, "qdisc", "add", "dev", link, "root", "tbf", "rate", f"{s.rate_mbit:g}mbit", "burst",
               str(burst), "latency", "50ms")  # fmt: skip

    def _netem(self, s: DeviceSpec, ends: list[tuple[str, str]]) -> str | None:
        """netem on both ends (the delay and jitter on the bridge's end only: packets to the device); None
        when the kernel has no netem."""
        delay = ["delay", f"{s.delay_ms or 0:g}ms"] + ([f"{s.jitter_ms:g}ms"] if s.jitter_ms else [])
        res = None
        for i, (ns, link) in enumerate(ends):
            args = list(delay) if s.wants_delay and i == 1 else []
            args += ["rate", f"{s.rate_mbit:g}mbit"] if s.rate_mbit else []
            res = tc("-n", ns, "qdisc", "add", "dev", link, "root", "netem", *args, "limit", "10000", check=False)
            if res.returncode != 0:
                break
        if res is not None and res.returncode == 0:
            self._netem_ok = True
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
            tc("-n", ns, "qdisc", "del", "dev", link, "root", check=False)
        self._netem_ok = False
        return None

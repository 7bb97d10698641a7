"""cgroup hierarchies (v1 and v2): finding them, delegating controllers, listing and removing cgroups.

A testbed's cgroups are named ``homering-testbed-NAME/DEV`` under this process's own cgroup, in the cgroup
v1 hierarchies that hold the controllers it needs, or in cgroup v2. The limits written into them are
:mod:`homering.testbed.limits`'.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import time
from dataclasses import dataclass
from pathlib import Path

from homering.errors import HomeringError
from homering.testbed.netns import NAME, PREFIX

log = logging.getLogger("homering.testbed")

V1_CONTROLLERS = frozenset(
    {
        "memory",
        "cpu",
        "cpuacct",
        "blkio",
        "cpuset",
        "pids",
        "devices",
        "freezer",
        "net_cls",
        "net_prio",
        "perf_event",
        "hugetlb",
        "rdma",
        "misc",
    }
)


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


def unescape(path: str) -> str:
    """A path as ``/proc/self/mountinfo`` writes it (``\\040`` for a space), unescaped."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def hierarchies() -> list[Hierarchy]:
    """The cgroup hierarchies mounted in this mount namespace, one entry per hierarchy."""
    own: dict[frozenset[str] | None, str] = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hid, names, path = line.split(":", 2)
            own[None if hid == "0" else frozenset(c for c in names.split(",") if c)] = path
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
        sb, root, mount = fields[2], unescape(fields[3]), Path(unescape(fields[4]))
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


def read(path: Path) -> str:
    """A cgroup (or /proc, /sys) file's content, stripped."""
    return path.read_text().strip()


def write(path: Path, value: str) -> None:
    """Write ``value`` to a cgroup file in one write (the kernel parses each write)."""
    with open(path, "w") as f:
        f.write(value)


def cgroup_pids(directory: Path) -> set[int]:
    """Processes in a cgroup and all its descendants."""
    pids: set[int] = set()
    for dirpath, _dirs, files in os.walk(directory):
        if "cgroup.procs" in files:
            try:
                pids |= {int(p) for p in (Path(dirpath) / "cgroup.procs").read_text().split()}
            except (OSError, ValueError):
                pass
    return pids


def v2_enable(directory: Path, controllers: list[str], stop: Path) -> list[str]:
    """Enable ``controllers`` for the children of ``directory`` (and, as needed, of its ancestors up to
    ``stop``). Returns those that could not be enabled."""
    try:
        enabled = set(read(directory / "cgroup.subtree_control").split())
        available = set(read(directory / "cgroup.controllers").split())
    except OSError:
        return list(controllers)
    missing = [c for c in controllers if c not in available]
    if missing and directory != stop and directory.parent != directory:
        v2_enable(directory.parent, missing, stop)
        try:
            available = set(read(directory / "cgroup.controllers").split())
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
            write(directory / "cgroup.subtree_control", f"+{c}")
        except OSError:
            failed.append(c)
    return failed


def v2_base(h: Hierarchy, controllers: list[str]) -> Path:
    """Where a testbed's v2 cgroup goes: this process's cgroup if it can delegate ``controllers``, else
    the nearest ancestor that can (cgroup v2's rule: no processes in a cgroup whose controllers are
    enabled for children). In a container whose cgroup root holds the processes, they move to a leaf
    ``homering-host`` first, as docker-in-docker does.

    Raises:
        HomeringError: no cgroup up to the mount point can delegate them.
    """
    own = h.own_dir
    candidates = [own, *[p for p in own.parents if p == h.mount or h.mount in p.parents]]
    for cand in candidates:
        if not v2_enable(cand, controllers, h.mount):
            return cand
    if own == h.mount:
        leaf = own / "homering-host"
        log.warning(
            "cgroup v2: moving the processes of %s into %s so that %s can be enabled for "
            "child cgroups (no internal processes)",
            own,
            leaf,
            "+".join(controllers),
        )
        leaf.mkdir(exist_ok=True)
        for pid in read(own / "cgroup.procs").split():
            try:
                write(leaf / "cgroup.procs", pid)
            except OSError:
                pass
        if not v2_enable(own, controllers, h.mount):
            return own
    raise HomeringError(
        f"cgroup v2: cannot enable {', '.join(controllers)} for child cgroups of {own} "
        "or any parent (is the cgroup delegated to us?)"
    )


def rmdir_tree(directory: Path, timeout: float = 5.0) -> bool:
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


def testbed_of_cgroup(dirname: str) -> str | None:
    """The testbed name of a cgroup directory called ``homering-testbed-NAME``, else None."""
    if not dirname.startswith(PREFIX):
        return None
    name = dirname[len(PREFIX) :]
    return name if NAME.match(name) else None


def find_cgroups(names: set[str] | None = None) -> list[Path]:
    """Testbed cgroups (``homering-testbed-NAME``) anywhere in the mounted hierarchies."""
    found: list[Path] = []
    for h in hierarchies():
        if h.version == 1 and not (h.controllers & {"memory", "cpu", "blkio"}):
            continue
        for dirpath, dirs, _files in os.walk(h.mount):
            keep = []
            for d in dirs:
                tb = testbed_of_cgroup(d)
                if tb is not None and (names is None or tb in names):
                    found.append(Path(dirpath) / d)
                else:
                    keep.append(d)
            dirs[:] = keep
    return found

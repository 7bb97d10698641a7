"""RAM available to homering: free system memory, capped by the process's cgroup.

A device of a home cluster may be a container or a systemd unit with a memory
limit (the test hosts of design.md use one cgroup per emulated device). What
the planner may count on is the smaller of

- ``psutil.virtual_memory().available`` (free + reclaimable memory of the
  machine), and
- the headroom under the tightest cgroup memory limit on the path from the
  process's cgroup up to the root of the mounted hierarchy:

  - cgroup v1 (``memory`` controller): ``memory.limit_in_bytes −
    memory.usage_in_bytes + total_inactive_file + total_active_file``
    (``memory.stat``; clean page cache, active or not, is reclaimed before
    the limit bites, as the kernel's ``MemAvailable`` assumes). A limit of
    2^60 bytes or more (the kernel writes ``PAGE_COUNTER_MAX`` pages,
    9223372036854771712 on x86-64) means "no limit";
  - cgroup v2: ``memory.max − memory.current + inactive_file + active_file`` (the same
    reasoning: v2 also charges page cache to ``memory.current``);
    ``memory.max`` of ``max`` means "no limit".

minus the process's own resident code and libraries (``RssFile``: page
cache in use, which the kernel would take back only to read it again at
once), minus :data:`AGENT_RESERVE_BYTES` for the agent's own footprint.
Before measuring, the C heap's free pages go back to the system
(:func:`release_free_heap`).

The cgroup code is pure over a root directory (``/`` on the real system), so
tests can build fake ``proc/self/cgroup`` and ``sys/fs/cgroup`` trees.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import psutil

AGENT_RESERVE_BYTES = 256 << 20
"""Bytes kept back for the agent process itself (Python, numpy, llama.cpp
contexts, KV caches of small windows, MQTT and TCP buffers): 256 MiB."""

AGENT_MIN_RESERVE_BYTES = 64 << 20
"""The least a small device keeps back (bytes): what an agent's anonymous memory grows
by once it loads windows (KV caches, llama.cpp compute buffers, Python) — measured
at 50-60 MiB for Llama-3.2-3B windows with n_ctx 320 and 64-token micro-batches."""

V1_UNLIMITED = 1 << 60
"""cgroup v1 limits at or above this many bytes mean "no limit"."""


@dataclass(frozen=True)
class CgroupPaths:
    """The process's cgroups as ``/proc/self/cgroup`` gives them.

    Attributes:
        v1_memory: path in the v1 ``memory`` hierarchy (``"/docker/abc"``), or None.
        v2: path in the unified (v2) hierarchy (the ``0::/path`` line), or None.
    """

    v1_memory: str | None
    v2: str | None


def parse_proc_cgroup(text: str, controller: str = "memory") -> CgroupPaths:
    """Parse ``/proc/<pid>/cgroup`` (lines ``hierarchy-id:controllers:path``).

    ``v1_memory`` is the path in the v1 hierarchy of ``controller`` (``memory`` by default).
    """
    v1 = v2 = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            v2 = path
        elif controller in controllers.split(","):
            v1 = path
    return CgroupPaths(v1_memory=v1, v2=v2)


@dataclass(frozen=True)
class _Mount:
    point: Path  # where the hierarchy is mounted, under the root directory
    root: str  # the cgroup path that appears at that mount point ("/" normally)


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts(root: Path, controller: str = "memory") -> tuple[list[_Mount], list[_Mount]]:
    """(v1 mounts of ``controller``, v2 mounts), from ``<root>/proc/self/mountinfo``.

    Without a readable mountinfo the usual places are assumed:
    ``sys/fs/cgroup/<controller>`` (v1), ``sys/fs/cgroup`` and ``sys/fs/cgroup/unified`` (v2).
    """
    v1: list[_Mount] = []
    v2: list[_Mount] = []
    try:
        text = (root / "proc/self/mountinfo").read_text()
    except OSError:
        base = root / "sys/fs/cgroup"
        return [_Mount(base / controller, "/")], [_Mount(base, "/"), _Mount(base / "unified", "/")]
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        mount = _Mount(root / _unescape(fields[4]).lstrip("/"), _unescape(fields[3]))
        if tail[0] == "cgroup2":
            v2.append(mount)
        elif tail[0] == "cgroup" and controller in tail[2].split(","):
            v1.append(mount)
    return v1, v2


def _levels(mount: _Mount, cg_path: str) -> list[Path]:
    """The process's cgroup directory under ``mount`` and its ancestors up to the mount point."""
    mroot = mount.root.rstrip("/")
    if cg_path == mount.root or mroot == "":
        rel = cg_path if mroot == "" else ""
    elif cg_path.startswith(mroot + "/"):
        rel = cg_path[len(mroot) :]
    else:
        rel = ""  # our cgroup is not below the mounted one: the mount is the best we know
    leaf = mount.point / rel.strip("/")
    if not leaf.is_dir():
        leaf = mount.point  # e.g. a container that sees its own cgroup at the mount point
    out = [leaf]
    while out[-1] != mount.point and mount.point in out[-1].parents:
        out.append(out[-1].parent)
    return out


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_stat(path: Path) -> dict[str, int]:
    out = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                out[key] = int(value)
    except OSError:
        pass
    return out


def v1_headroom(cgroup_dir: Path) -> int | None:
    """Bytes left under one v1 memory cgroup's limit, or None when it has no limit.

    ``memory.limit_in_bytes − memory.usage_in_bytes + total_inactive_file +
    total_active_file`` (the non-total keys when the totals are absent), at
    least 0, at most the limit.
    """
    limit = _read_int(cgroup_dir / "memory.limit_in_bytes")
    if limit is None or limit >= V1_UNLIMITED:
        return None
    usage = _read_int(cgroup_dir / "memory.usage_in_bytes") or 0
    stat = _read_stat(cgroup_dir / "memory.stat")
    reclaimable = stat.get("total_inactive_file", stat.get("inactive_file", 0)) + stat.get(
        "total_active_file", stat.get("active_file", 0)
    )
    return max(0, min(limit, limit - usage + reclaimable))


def v2_headroom(cgroup_dir: Path) -> int | None:
    """Bytes left under one v2 cgroup's ``memory.max``, or None when it has none (``max``/absent).

    ``memory.max − memory.current + inactive_file + active_file``
    (``memory.stat``), at least 0, at most the limit.
    """
    try:
        raw = (cgroup_dir / "memory.max").read_text().strip()
    except OSError:
        return None
    if raw == "max" or not raw.isdigit():
        return None
    limit = int(raw)
    usage = _read_int(cgroup_dir / "memory.current") or 0
    stat = _read_stat(cgroup_dir / "memory.stat")
    reclaimable = stat.get("inactive_file", 0) + stat.get("active_file", 0)
    return max(0, min(limit, limit - usage + reclaimable))


def cgroup_memory_headroom(root: str | Path = "/") -> int | None:
    """Bytes the process may still use under its cgroup memory limits, or None if unlimited.

    Reads ``<root>/proc/self/cgroup``, ``<root>/proc/self/mountinfo`` and the
    cgroup files under the mount points found there (see the module
    docstring). Every level from the process's cgroup up to the mounted root
    counts (a parent's limit binds its children); v1 and v2 are both read
    (hybrid hosts), and the smallest headroom wins.

    Args:
        root: the file-system root to read under; ``/`` on the real system.

    Returns:
        Bytes (>= 0), or None when no cgroup limit applies or nothing is readable
        (no cgroups: macOS; SELinux on Android). Never raises on missing files.
    """
    return _smallest(Path(root), "memory", v1_headroom, v2_headroom)


_N = TypeVar("_N", int, float)


def _smallest(
    root: Path, controller: str, v1_read: Callable[[Path], _N | None], v2_read: Callable[[Path], _N | None]
) -> _N | None:
    """The smallest value ``v1_read``/``v2_read`` give over every level of the process's cgroups, or None.

    Walks the v1 hierarchy of ``controller`` and the v2 hierarchy, from the
    process's cgroup up to each mount point; readers return None where no limit is set.
    """
    try:
        paths = parse_proc_cgroup((root / "proc/self/cgroup").read_text(), controller)
    except OSError:
        return None
    v1_mounts, v2_mounts = _cgroup_mounts(root, controller)
    found: list[_N] = []
    for mounts, cg_path, read in ((v1_mounts, paths.v1_memory, v1_read), (v2_mounts, paths.v2, v2_read)):
        if cg_path is None:
            continue
        for mount in mounts:
            if mount.point.is_dir():
                found += [v for d in _levels(mount, cg_path) if (v := read(d)) is not None]
    return min(found) if found else None


def _v1_cpu_quota(cgroup_dir: Path) -> float | None:
    quota, period = _read_int(cgroup_dir / "cpu.cfs_quota_us"), _read_int(cgroup_dir / "cpu.cfs_period_us")
    if quota is None or period is None or quota < 0 or period <= 0:
        return None
    return quota / period


def _v2_cpu_quota(cgroup_dir: Path) -> float | None:
    try:
        quota, period = (cgroup_dir / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def cgroup_cpu_quota(root: str | Path = "/") -> float | None:
    """The CPU time the process's cgroups allow, in cores (``0.425`` = 42.5 ms per 100 ms), or None.

    v1 ``cpu.cfs_quota_us / cpu.cfs_period_us`` or v2 ``cpu.max``, at every
    level from the process's cgroup up; the smallest wins. A quota does not
    slow a short burst (it runs at full speed, then waits for the next
    period), so the compute probe uses it to turn CPU time into wall time.

    Args:
        root: the file-system root to read under; ``/`` on the real system.
    """
    return _smallest(Path(root), "cpu", _v1_cpu_quota, _v2_cpu_quota)


def own_file_bytes(root: str | Path = "/") -> int:
    """This process's resident file-backed memory (``RssFile`` of ``/proc/self/status``), bytes; 0 if unknown."""
    try:
        text = (Path(root) / "proc" / "self" / "status").read_text()
    except OSError:
        return 0
    m = re.search(r"^RssFile:\s+(\d+)\s*kB", text, re.M)
    return int(m.group(1)) * 1024 if m else 0


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn  # type: ignore[no-any-return]


def release_free_heap() -> bool:
    """Give the free pages of this process's C heap back to the system (glibc's ``malloc_trim(0)``); False
    where there is no such call.

    glibc keeps what llama.cpp frees (a profiling run's compute buffers and contexts) in its arenas: a
    process that profiled its device held 25-40 MiB more anonymous memory afterwards than one that read its
    profile from the cache, so the same device reported 174 MiB in one run and 215 in the next, and the
    speculative head's choice, which asks for the draft plus a head's share (177 MiB on home4), flipped
    from D1 to D3 (1.44x instead of 1.8x plain decoding). The process would reuse those pages for its next
    allocations anyway: they are RAM it may count on."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def available_ram_bytes(*, reserve: int = AGENT_RESERVE_BYTES, root: str | Path = "/") -> int:
    """RAM homering may use on this device now, in bytes; measured fresh on every call.

    ``min(psutil.virtual_memory().available, cgroup headroom) − own RssFile − reserve``, after
    :func:`release_free_heap`, at
    least 0 (see the module docstring). On a small device the reserve shrinks
    to an eighth of what is available, but not below
    :data:`AGENT_MIN_RESERVE_BYTES`, so a phone-sized cgroup of a few hundred
    MiB still offers most of its RAM to the planner.

    Args:
        reserve: bytes kept back for the agent itself, at most
            (:data:`AGENT_RESERVE_BYTES`).
        root: file-system root for the cgroup files (tests pass a fake tree).
    """
    release_free_heap()
    available = psutil.virtual_memory().available
    headroom = cgroup_memory_headroom(root)
    if headroom is not None:
        available = min(available, headroom)
    available = max(0, available - own_file_bytes(root))
    return max(0, available - min(reserve, max(AGENT_MIN_RESERVE_BYTES, available // 8)))

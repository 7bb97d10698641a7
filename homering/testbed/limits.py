"""A testbed's cgroups and the limits in them: RAM (page cache included), CPU quota and disk read speed.

:class:`Cgroups` creates one testbed directory per hierarchy used (``homering-testbed-NAME``) and one
directory per device below it, and writes the device's limits (cgroup v1 or v2 files). The functions
at the end read a device's memory counters back.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from homering.errors import HomeringError
from homering.testbed.cgroups import Hierarchy, hierarchies, read, unescape, v2_base, v2_enable, write
from homering.testbed.netns import PREFIX
from homering.testbed.spec import DeviceSpec

log = logging.getLogger("homering.testbed")

CPU_PERIOD_US = 10_000
"""CFS period of the CPU quotas. Short, so that a device is slow all the time rather than fast for a
quota's worth of every period and then stopped: with the kernel's default 100 ms a 0.425-core device
runs 42.5 ms at full speed, and the profiler's median decode time sees a full-speed CPU."""


def cpu_quota(cpus: float) -> tuple[int, int]:
    """``(quota_us, period_us)`` for ``cpus`` cores: the period is :data:`CPU_PERIOD_US`, longer when
    the quota would go below the kernel's 1 ms minimum."""
    period = max(CPU_PERIOD_US, int(-(-1000 // cpus)))
    return max(1000, round(cpus * period)), period


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
        resolved = os.path.realpath(path)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            left, _, right = line.partition(" - ")
            mp = unescape(left.split()[4])
            if (resolved + "/").startswith(mp.rstrip("/") + "/") and len(mp) > best:
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
            major_minor = read(real / "dev")
        except OSError:
            return None, f"cannot find the disk of partition {major}:{minor}"
    else:
        major_minor = f"{major}:{minor}"
    return major_minor, real.name


Disk = tuple[str | None, str]
"""A block device to throttle (``MAJ:MIN``, None when none) and its description (or why not)."""


class Cgroups:
    """The cgroups of one testbed, as it creates them (for teardown to remove them).

    Args:
        name: the testbed's name.
        workdir: the testbed's folder; disk read throttles apply to the disk that holds it.
        warn: called with a message for each limit that cannot be emulated.

    Attributes:
        roots: the testbed's directory in every hierarchy used (the devices' cgroups are below).
    """

    def __init__(self, name: str, workdir: Path, warn: Callable[[str], None]):
        self.name = name
        self.workdir = workdir
        self.roots: list[Path] = []
        self._warn = warn
        self._layout: list[tuple[Hierarchy, Path, set[str]]] = []  # (hierarchy, testbed dir, controllers)
        self._disk: Disk | None = None

    def make(self, devices: list[DeviceSpec]) -> None:
        """Create the testbed's directory in every hierarchy that holds a controller the devices need.

        Raises:
            HomeringError: no memory controller, or v2 controllers that cannot be enabled.
            OSError: a cgroup that cannot be created.
        """
        hs = hierarchies()
        need_disk = any(d.disk_read_mbps for d in devices)
        wanted = {"memory": "memory", "cpu": "cpu"} | ({"blkio": "io"} if need_disk else {})
        v1: dict[str, Hierarchy] = {}
        for key in wanted:
            h = next((h for h in hs if h.version == 1 and key in h.controllers), None)
            if h is not None:
                v1[key] = h
        unified = next((h for h in hs if h.version == 2), None)
        v2_ctrls = [
            wanted[k] for k in wanted if k not in v1 and unified is not None and wanted[k] in unified.controllers
        ]
        if "memory" not in v1 and "memory" not in v2_ctrls:
            raise HomeringError("no memory cgroup controller is mounted (cgroup v1 memory or v2 memory)")
        for key in wanted:
            if key not in v1 and wanted[key] not in v2_ctrls:
                self._warn(
                    f"no {wanted[key]} cgroup controller: "
                    f"{'CPU quotas' if key == 'cpu' else 'disk throttles'} are not emulated"
                )
        # one testbed directory per hierarchy, the devices below it
        tb_dir = PREFIX + self.name
        for h in {id(h): h for h in v1.values()}.values():
            self._layout.append((h, h.own_dir / tb_dir, set(h.controllers)))
        if v2_ctrls and unified is not None:
            self._layout.append((unified, v2_base(unified, v2_ctrls) / tb_dir, set(v2_ctrls)))
        for h, root, ctrls in self._layout:
            self.roots.append(root)
            root.mkdir()
            if h.version == 2:
                failed = v2_enable(root, sorted(ctrls), root)
                if failed:
                    raise HomeringError(f"cgroup v2: cannot enable {', '.join(failed)} in {root}")
        self._disk = self._find_disk() if need_disk else None

    def add_device(self, s: DeviceSpec) -> tuple[list[Path], str]:
        """A device's cgroup in every hierarchy, with its limits written.

        Returns:
            (its cgroup directories, how its disk reads are throttled: e.g. ``"72 MB/s (sda)"`` or ``"-"``).
        """
        dirs, disk = [], "-"
        for h, root, ctrls in self._layout:
            cg = root / s.name
            cg.mkdir()
            dirs.append(cg)
            limit = self._limit_v1 if h.version == 1 else self._limit_v2
            disk = limit(s, cg, ctrls) or disk
        if s.disk_read_mbps and disk == "-":
            disk = "not throttled"
        return dirs, disk

    def forget(self) -> None:
        """Forget what was created (after it was removed)."""
        self.roots, self._layout, self._disk = [], [], None

    def _find_disk(self) -> Disk:
        try:
            majmin, what = block_device_of(self.workdir)
        except OSError as exc:
            majmin, what = None, f"cannot find the disk of {self.workdir}: {exc.strerror or exc}"
        if majmin is None:
            self._warn(f"disk read throttles are not emulated: {what}")
        return majmin, what

    def _throttle(self, s: DeviceSpec, file: Path, line: str) -> str:
        """Write a read throttle; returns the device's disk description."""
        assert self._disk is not None and self._disk[0] is not None
        try:
            write(file, line)
            return f"{s.disk_read_mbps:g} MB/s ({self._disk[1]})"
        except OSError as exc:
            self._warn(f"cannot throttle disk reads of {s.name} on {self._disk[0]}: {exc.strerror or exc}")
            return "not throttled"

    def _limit_v1(self, s: DeviceSpec, cg: Path, ctrls: set[str]) -> str | None:
        if "memory" in ctrls:
            write(cg / "memory.limit_in_bytes", str(s.ram))
            if (cg / "memory.memsw.limit_in_bytes").exists():
                try:
                    write(cg / "memory.memsw.limit_in_bytes", str(s.ram))
                except OSError as exc:
                    log.debug("memsw limit of %s: %s", s.name, exc)
            try:
                write(cg / "memory.swappiness", "0")
            except OSError as exc:
                log.debug("swappiness of %s: %s", s.name, exc)
        if "cpu" in ctrls:
            quota, period = cpu_quota(s.cpus)
            write(cg / "cpu.cfs_period_us", str(period))
            write(cg / "cpu.cfs_quota_us", str(quota))
        if "blkio" in ctrls and s.disk_read_mbps and self._disk and self._disk[0]:
            bps = round(s.disk_read_mbps * 1e6)
            return self._throttle(s, cg / "blkio.throttle.read_bps_device", f"{self._disk[0]} {bps}")
        return None

    def _limit_v2(self, s: DeviceSpec, cg: Path, ctrls: set[str]) -> str | None:
        if "memory" in ctrls:
            write(cg / "memory.max", str(s.ram))
            if (cg / "memory.swap.max").exists():
                write(cg / "memory.swap.max", "0")
        if "cpu" in ctrls:
            quota, period = cpu_quota(s.cpus)
            write(cg / "cpu.max", f"{quota} {period}")
        if "io" in ctrls and s.disk_read_mbps and self._disk and self._disk[0]:
            bps = round(s.disk_read_mbps * 1e6)
            return self._throttle(s, cg / "io.max", f"{self._disk[0]} rbps={bps}")
        return None


# ---------------------------------------------------------------- a device's memory counters
def _memory_dir(device: str, cgroups: list[Path]) -> tuple[int, Path]:
    for cg in cgroups:
        if (cg / "memory.limit_in_bytes").exists():
            return 1, cg
        if (cg / "memory.max").exists():
            return 2, cg
    raise HomeringError(f"device {device!r} has no memory cgroup")


def memory_usage(device: str, cgroups: list[Path]) -> int:
    """Bytes charged to the device (its ``cgroups``) now, page cache included."""
    v, cg = _memory_dir(device, cgroups)
    return int(read(cg / ("memory.usage_in_bytes" if v == 1 else "memory.current")))


def memory_limit(device: str, cgroups: list[Path]) -> int:
    """The device's memory limit in bytes."""
    v, cg = _memory_dir(device, cgroups)
    text = read(cg / ("memory.limit_in_bytes" if v == 1 else "memory.max"))
    return (1 << 63) - 1 if text == "max" else int(text)


def memory_peak(device: str, cgroups: list[Path]) -> int | None:
    """The most bytes ever charged to the device (None when the kernel does not say: v2 before 5.19)."""
    v, cg = _memory_dir(device, cgroups)
    f = cg / ("memory.max_usage_in_bytes" if v == 1 else "memory.peak")
    return int(read(f)) if f.exists() else None


def disk_read_bytes(device: str, cgroups: list[Path]) -> int | None:
    """Bytes the device's processes have read from block devices since its cgroup was made (v2 ``io.stat``
    ``rbytes``, v1 ``blkio.throttle.io_service_bytes`` ``Read``, summed over block devices); None without an
    I/O controller. Page-cache hits are not reads: this is what the disk served."""
    for cg in cgroups:
        if (cg / "io.stat").exists():
            return sum(int(m) for m in re.findall(r"\brbytes=(\d+)", read(cg / "io.stat")))
        if (cg / "blkio.throttle.io_service_bytes").exists():
            text = read(cg / "blkio.throttle.io_service_bytes")
            return sum(int(m) for m in re.findall(r"^\S+ Read (\d+)$", text, re.M))
    return None


def oom_kills(device: str, cgroups: list[Path]) -> int:
    """Processes the kernel's OOM killer killed in the device (its cgroup's ``oom_kill`` count)."""
    v, cg = _memory_dir(device, cgroups)
    text = read(cg / ("memory.oom_control" if v == 1 else "memory.events"))
    m = re.search(r"^oom_kill (\d+)$", text, re.M)
    return int(m.group(1)) if m else 0

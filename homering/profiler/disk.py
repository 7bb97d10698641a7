"""Read throughput of the disk that holds the layer-window cache.

The planner needs how fast a device can page model weights in from disk
(windows are memory-mapped; what does not fit in RAM is read again every
round). The probe reads a scratch file of random bytes after dropping it from
the page cache:

- Linux/Android: ``posix_fadvise(POSIX_FADV_DONTNEED)`` after ``fsync``, then
  sequential reads in 4 MiB chunks (page faults on a memory-mapped window
  trigger the kernel's readahead, which looks much like this);
- macOS: ``F_NOCACHE`` on the descriptors and 64 KiB reads at random offsets
  (macOS pages mmapped files in small random reads).

The scratch file (``.homering-disk-probe.<pid>.<random>.bin``, 1 GiB by default) is
written next to the windows and removed as soon as it has been read: the
figure is cached with the profile (:mod:`homering.profiler.device`), so a new
measurement is rare and rewriting the file then costs a few seconds, while
keeping it would cost every agent's home 1 GiB of disk. Probe files that a
killed process left, and the :data:`DISK_PROBE_NAME` that homering once kept
for good, are removed on the next measurement.

Caveat: on a tmpfs/ramdisk, or where ``posix_fadvise`` is missing or ignored,
the figure is the page cache's speed, not the disk's. It is reported as
measured; above :data:`PAGE_CACHE_SUSPECT_GBPS` a warning is logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
import time
from pathlib import Path

import numpy as np

from homering import paths
from homering.errors import HomeringError

log = logging.getLogger(__name__)

DISK_PROBE_BYTES = 1 << 30
"""Default size of the scratch file, bytes (1 GiB). Smaller files read too fast under a read throttle: on
the testbed's D1 (a 0.72 GB/s cgroup throttle, 2.4 GiB memory limit) 256 MiB probes gave 0.81 and 1.11
GB/s, and agents' profiles up to 1.24 GB/s, which made the planner stream windows from that disk; 1 GiB
gave 0.74-0.75 GB/s."""
DISK_PROBE_NAME = "homering-disk-probe.bin"
"""File name of the scratch file that earlier versions kept in the cache folder (removed on sight)."""
DISK_PROBE_PREFIX = ".homering-disk-probe."
"""Scratch files are ``<prefix><pid>.<random>.bin``, removed after the measurement."""
PAGE_CACHE_SUSPECT_GBPS = 20.0
"""Throughput (GB/s) above which the reads were most likely served by the page cache."""
F_NOCACHE = 48
"""macOS ``fcntl`` command: turn data caching off for a descriptor."""

_CHUNK = 4 << 20
_RANDOM_BLOCK = 64 << 10


def measure_disk_gbps(directory: str | os.PathLike[str] | None = None, *, size_bytes: int = DISK_PROBE_BYTES) -> float:
    """Read throughput of the disk under ``directory``, in GB/s (1e9 bytes per second).

    Writes a ``size_bytes`` scratch file in ``directory``, drops it from the
    page cache, times reading all of it (see the module docstring for the
    method per OS) and removes it: nothing is left behind, also on errors.

    Args:
        directory: where to measure; default the window cache
            (:func:`homering.paths.windows_dir`).
        size_bytes: scratch file size in bytes, at least 1 MiB; a few hundred
            MiB give a stable figure.

    Returns:
        GB/s, > 0. May be the page cache's speed where dropping the file from
        the cache does not work (logged as a warning above 20 GB/s).

    Raises:
        ValueError: ``size_bytes`` below 1 MiB.
        HomeringError: the folder cannot be written or the file read.
    """
    if size_bytes < (1 << 20):
        raise ValueError(f"disk probe needs at least 1 MiB, got {size_bytes} bytes")
    folder = Path(directory) if directory is not None else paths.windows_dir()
    path = folder / f"{DISK_PROBE_PREFIX}{os.getpid()}.{secrets.token_hex(4)}.bin"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_probes(folder)
        _write_random(path, size_bytes)
        if sys.platform == "darwin":
            n_bytes, seconds = _read_random_nocache(path, size_bytes)
        else:
            n_bytes, seconds = _read_sequential_dropped(path)
    except OSError as exc:
        raise HomeringError(f"cannot measure disk read speed in {folder}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
    if n_bytes == 0:
        raise HomeringError(f"disk probe {path} read nothing")
    gbps = n_bytes / max(seconds, 1e-9) / 1e9
    if gbps > PAGE_CACHE_SUSPECT_GBPS:
        log.warning(
            "disk probe read %.1f GB/s in %s: the page cache probably served it "
            "(tmpfs, or dropping cached pages does not work here)",
            gbps,
            folder,
        )
    return gbps


def _remove_stale_probes(folder: Path) -> None:
    """Remove the probe file earlier versions kept, and probe files of processes that are gone."""
    (folder / DISK_PROBE_NAME).unlink(missing_ok=True)
    for path in folder.glob(f"{DISK_PROBE_PREFIX}*.bin"):
        pid = path.name[len(DISK_PROBE_PREFIX) :].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def _write_random(path: Path, size: int) -> None:
    """Write ``size`` random bytes (fresh per chunk: nothing to compress or deduplicate), fsync, uncache."""
    rng = np.random.default_rng()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _nocache(fd)
        left = size
        while left > 0:
            n = min(_CHUNK, left)
            view = memoryview(rng.bytes(n))
            while view:
                view = view[os.write(fd, view) :]
            left -= n
        os.fsync(fd)
        _drop_cached(fd)
    finally:
        os.close(fd)


def _nocache(fd: int) -> None:
    """macOS: F_NOCACHE on the descriptor (no-op elsewhere)."""
    if sys.platform == "darwin":
        import fcntl

        try:
            fcntl.fcntl(fd, F_NOCACHE, 1)
        except OSError as exc:
            log.warning("F_NOCACHE failed (%s): the disk figure may be the page cache's", exc)


def _drop_cached(fd: int) -> bool:
    """Evict the file's clean pages from the page cache; False when the OS offers no way."""
    fadvise = getattr(os, "posix_fadvise", None)
    if fadvise is None:
        return False
    try:
        fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False


def _read_sequential_dropped(path: Path) -> tuple[int, float]:
    """Linux/Android: drop the file from the cache, read it in 4 MiB chunks → (bytes, seconds)."""
    with open(path, "rb", buffering=0) as f:
        if not _drop_cached(f.fileno()):
            log.warning("posix_fadvise is not available: the disk figure may be the page cache's")
        buf = memoryview(bytearray(_CHUNK))
        total = 0
        t0 = time.perf_counter()
        while n := f.readinto(buf):
            total += n
        return total, time.perf_counter() - t0


def _read_random_nocache(path: Path, size: int) -> tuple[int, float]:
    """macOS: F_NOCACHE, every 64 KiB block once in random order → (bytes, seconds)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _nocache(fd)
        offsets = np.random.default_rng().permutation(size // _RANDOM_BLOCK) * _RANDOM_BLOCK
        total = 0
        t0 = time.perf_counter()
        for off in offsets.tolist():
            total += len(os.pread(fd, _RANDOM_BLOCK, off))
        return total, time.perf_counter() - t0
    finally:
        os.close(fd)

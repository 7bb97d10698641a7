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

The scratch file, :data:`DISK_PROBE_NAME`, stays in the cache folder and is
reused by later runs (it is rewritten only when its size differs).

Caveat: on a tmpfs/ramdisk, or where ``posix_fadvise`` is missing or ignored,
the figure is the page cache's speed, not the disk's. It is reported as
measured; above :data:`PAGE_CACHE_SUSPECT_GBPS` a warning is logged.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from homering import paths
from homering.errors import HomeringError

log = logging.getLogger(__name__)

DISK_PROBE_BYTES = 256 << 20
"""Default size of the scratch file, bytes (256 MiB)."""
DISK_PROBE_NAME = "homering-disk-probe.bin"
"""File name of the scratch file inside the cache folder."""
PAGE_CACHE_SUSPECT_GBPS = 20.0
"""Throughput (GB/s) above which the reads were most likely served by the page cache."""
F_NOCACHE = 48
"""macOS ``fcntl`` command: turn data caching off for a descriptor."""

_CHUNK = 4 << 20
_RANDOM_BLOCK = 64 << 10


def measure_disk_gbps(directory: str | os.PathLike | None = None, *,
                      size_bytes: int = DISK_PROBE_BYTES) -> float:
    """Read throughput of the disk under ``directory``, in GB/s (1e9 bytes per second).

    Writes (or reuses) a ``size_bytes`` scratch file :data:`DISK_PROBE_NAME`
    in ``directory``, drops it from the page cache and times reading all of
    it (see the module docstring for the method per OS).

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
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = _probe_file(folder, size_bytes)
        if sys.platform == "darwin":
            n_bytes, seconds = _read_random_nocache(path, size_bytes)
        else:
            n_bytes, seconds = _read_sequential_dropped(path)
    except OSError as exc:
        raise HomeringError(f"cannot measure disk read speed in {folder}: {exc.strerror or exc}") from None
    if n_bytes == 0:
        raise HomeringError(f"disk probe {path} read nothing")
    gbps = n_bytes / max(seconds, 1e-9) / 1e9
    if gbps > PAGE_CACHE_SUSPECT_GBPS:
        log.warning("disk probe read %.1f GB/s in %s: the page cache probably served it "
                    "(tmpfs, or dropping cached pages does not work here)", gbps, folder)
    return gbps


def _probe_file(folder: Path, size: int) -> Path:
    """The scratch file of exactly ``size`` bytes, written if missing or of another size."""
    path = folder / DISK_PROBE_NAME
    try:
        if path.stat().st_size == size:
            return path
        path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        _write_random(tmp, size)
        os.replace(tmp, path)  # other profilers never see half a file
    finally:
        tmp.unlink(missing_ok=True)
    return path


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
                view = view[os.write(fd, view):]
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

"""Page-cache advice for memory-mapped window files: prefetch the next window, release the last.

PRIMA.CPP (§3.3) overlaps disk loading with the ring: while other devices
compute, a device reads its next window into the page cache. On a device whose
windows do not all fit in RAM it also drops the window it just used, so the
kernel does not evict the *next* window to make room.

llama.cpp maps each window file ``MAP_SHARED``/``PROT_READ``. Pages mapped
into a process cannot be dropped with ``posix_fadvise(DONTNEED)`` alone (the
kernel skips mapped pages), so :meth:`WindowPages.release` first unmaps them
from this process with ``madvise(MADV_DONTNEED)`` on llama.cpp's own mapping
(found in ``/proc/self/maps``; the pages are clean file pages, so nothing is
lost: the next access faults them in again), then drops them from the page
cache. Linux only; elsewhere both calls do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger("homering.pages")

_MADV_DONTNEED = 4  # Linux <asm-generic/mman-common.h>
_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc


def madvise(addr: int, length: int, advice: int) -> None:
    """``madvise(2)`` on ``length`` bytes at ``addr`` (page-aligned).

    Raises:
        OSError: the kernel refused the advice.
    """
    if _load_libc().madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise: {os.strerror(err)}")


def mappings_of(path: str | Path) -> list[tuple[int, int, int]]:
    """This process's mappings of ``path`` as ``(start, end, offset)``: virtual addresses and the file offset
    mapped at ``start`` (llama.cpp may map a file from a page-aligned offset, not 0); [] off Linux."""
    target = os.path.realpath(path)
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") == target:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((start, end, int(parts[2], 16)))
    except OSError:
        return []
    return out


READAHEAD_FALLBACK = 128 << 10
"""Bytes per ``WILLNEED`` call where the disk's limits cannot be read (Linux's default read-ahead)."""


def readahead_limit(path: str | Path) -> int:
    """The most one ``posix_fadvise(WILLNEED)`` call reads on the disk holding ``path``, bytes.

    Linux reads at most ``max(read_ahead_kb, max_sectors_kb)`` per call (``force_page_cache_ra``) and ignores
    the rest of the range: one call over a 285 MB layer read 8 MiB here. Callers advise in chunks of this
    size. From ``/sys/dev/block/<major>:<minor>`` (its ``queue/``, or its parent's for a partition);
    :data:`READAHEAD_FALLBACK` where they cannot be read.
    """
    try:
        dev = os.stat(path).st_dev
        base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    except OSError:
        return READAHEAD_FALLBACK
    for queue in (base / "queue", base.parent / "queue"):
        try:
            kb = max(int((queue / name).read_text()) for name in ("read_ahead_kb", "max_sectors_kb"))
        except (OSError, ValueError):
            continue
        if kb > 0:
            return kb << 10
    return READAHEAD_FALLBACK


class WindowPages:
    """Prefetch and release advice for one window file.

    Args:
        path: the window's GGUF file (the one llama.cpp memory-maps).
        skip: a byte range ``(start, end)`` the prefetch leaves out: the token embedding of a window that
            only looks rows up in it (:func:`homering.engine.streaming.unread_span`); at 32B it is 440 MB,
            of which a token reads a few KiB.

    The file stays open read-only for the advice calls. ``close()`` closes it.
    A freshly sliced window may still have dirty pages, which the kernel
    cannot drop: they are written back here, once.
    """

    supported = hasattr(os, "posix_fadvise")

    def __init__(self, path: str | Path, skip: tuple[int, int] | None = None):
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDONLY) if self.supported else -1
        self._maps: list[tuple[int, int, int]] | None = None  # llama.cpp's mappings, found at the first release
        size = os.path.getsize(self.path)
        self._read = [(0, size)]  # (start, end) ranges to prefetch
        if skip is not None:
            self._read = [(a, b) for a, b in ((0, skip[0]), (skip[1], size)) if b > a]
        self._chunk = readahead_limit(self.path)
        if self.fd >= 0:
            os.fsync(self.fd)

    def prefetch(self) -> None:
        """Start asynchronous readahead of the file but ``skip`` (``POSIX_FADV_WILLNEED``, in chunks of the
        disk's read-ahead limit, :func:`readahead_limit`); does not block."""
        if self.fd >= 0:
            for start, end in self._read:
                for offset in range(start, end, self._chunk):
                    os.posix_fadvise(self.fd, offset, min(self._chunk, end - offset), os.POSIX_FADV_WILLNEED)

    def release(self) -> None:
        """Unmap this process's pages of the file and drop them from the page cache.

        The mapping stays valid; later reads fault the pages in from disk.
        The file's mappings are looked up once, at the first call: create the
        object after llama.cpp has mapped the file.
        """
        if self.fd < 0:
            return
        if self._maps is None:  # once: the mapping lives as long as the window; release runs every token
            self._maps = mappings_of(self.path)
        for start, end, _ in self._maps:
            try:
                madvise(start, end - start, _MADV_DONTNEED)
            except OSError as exc:  # never fatal: the advice is an optimisation
                log.debug("madvise(DONTNEED) on %s failed: %s", self.path.name, exc)
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def resident_bytes(path: str | Path) -> int:
    """Bytes of ``path`` now in the page cache, by ``mincore`` over a fresh mapping (Linux, macOS).

    Raises:
        OSError: the file cannot be mapped or mincore fails.
    """
    import mmap

    return int(resident_pages(path).sum()) * mmap.PAGESIZE


def resident_pages(path: str | Path) -> npt.NDArray[np.bool_]:
    """Which pages of ``path`` are in the page cache now: one bool per ``mmap.PAGESIZE`` bytes of the file
    (``mincore`` over a fresh read-only mapping; Linux, macOS).

    Raises:
        OSError: the file cannot be mapped or mincore fails.
    """
    import mmap

    size = os.path.getsize(path)
    if size == 0:
        return np.zeros(0, dtype=bool)
    page = mmap.PAGESIZE
    n_pages = (size + page - 1) // page
    libc = _load_libc()
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        view = np.frombuffer(mm, dtype=np.uint8)
        vec = np.zeros(n_pages, dtype=np.uint8)
        try:
            if (
                libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), ctypes.c_void_p(vec.ctypes.data))
                != 0
            ):
                err = ctypes.get_errno()
                raise OSError(err, f"mincore: {os.strerror(err)}")
        finally:
            del view
        return (vec & 1).astype(bool)


M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(n: int = 1) -> bool:
    """Let glibc's malloc use at most ``n`` arenas (``mallopt(M_ARENA_MAX, n)``); False where it cannot.

    By default glibc gives threads arenas of their own, and each keeps freed
    pages that count as the process's anonymous memory: an agent's compute
    and data-plane threads held about 20 MiB that way (a head serving
    SmolLM2: 267 -> 247 MiB with one arena). Lock contention was within the
    machine's noise: `bench concurrent` (4 agents, SmolLM2, 4 streams) gave
    69.4 tokens/s with one arena, 69.0 with two and 73.8 without a limit
    (means of 3-4 runs, 61-76 single runs). Call it before threads start.
    """
    try:
        libc = _load_libc()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_ARENA_MAX, n) == 1)


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim(0)``; elsewhere nothing).

    llama.cpp frees a closed context's buffers, but glibc keeps the pages in
    its arenas, where they still count as the process's anonymous memory.
    The agent calls this after profiling and after loading a plan.
    """
    try:
        libc = _load_libc()
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = (ctypes.c_size_t,)
    trim(0)

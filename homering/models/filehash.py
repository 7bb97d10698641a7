"""A file's SHA-256, remembered beside it, and files written without filling the page cache.

Window files are named and checked by their SHA-256 (:mod:`homering.transport.windows`). Hashing a big
window takes seconds, so a file's hash is remembered in a sidecar ``<file>.sha256`` together with its size,
mtime, ctime and inode: any write to the file (which changes its ctime) makes the next check hash it again.

The slicer hashes a window while writing it (:class:`HashingWriter`) and then drops the written pages from
the page cache (:func:`drop_written`): a controller that slices 18 GiB of windows keeps no page of them, and
on an emulated cluster (one host, one page cache) the device that maps a window reads it from disk and pays
for its pages itself, instead of finding them cached on the controller's account.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 8 << 20
"""Bytes read at a time when hashing."""


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} {st.st_ino}"


def _memo(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def remember(path: str | os.PathLike, digest: str) -> None:
    """Record ``digest`` (hex) as the SHA-256 of ``path`` as it is now (nothing when the folder is read-only)."""
    path = Path(path)
    memo = _memo(path)
    try:
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{digest} {_stamp(path.stat())}\n")
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only folder (a mounted model): hash again next time


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, hex; remembered in ``<path>.sha256`` while the file is unchanged (see the module).

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(path)
    st = path.stat()
    try:
        digest, stamp = _memo(path).read_text().split(" ", 1)
        if stamp.strip() == _stamp(st) and len(digest) == 64:
            return digest
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            h.update(chunk)
    digest = h.hexdigest()
    if _stamp(path.stat()) == _stamp(st):  # not written meanwhile
        remember(path, digest)
    return digest


def forget(path: str | os.PathLike) -> None:
    """Delete ``path``'s remembered hash."""
    _memo(Path(path)).unlink(missing_ok=True)


class HashingWriter:
    """A binary file that hashes (SHA-256) what is written to it, in order (``write``/``tell`` only).

    Args:
        out: the file, opened for writing at its start.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes, /) -> int:
        self.sha256.update(data)
        return self.out.write(data)

    def tell(self) -> int:
        return self.out.tell()


def drop_written(out: BinaryIO) -> None:
    """Flush ``out`` to disk and drop its pages from the page cache (``posix_fadvise(DONTNEED)``; where that is
    missing, as on macOS, the pages stay)."""
    out.flush()
    os.fsync(out.fileno())
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(out.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

"""The disk a benchmark's window files take: one store on the host, sampled while a run goes on, emptied after it.

Every plan variant of ``homering bench cluster`` has its own windows: the controller slices them all
(to hash them), and each agent, which has the model here, would slice its own into its home, so at
32B one run took twice the model (45 GB for 19.8 GB). The emulated devices share one host, so their
window folders and the controller's are links to one store (:meth:`WindowDisk.share`): an agent finds
the controller's file, checked by the hash remembered beside it, and the run takes the model's size
once. The slicer leaves none of a window's pages in the page cache
(:mod:`homering.models.filehash`), so each device still reads its windows from disk and pays for their
pages in its own cgroup. The store is emptied after each run: the disk the bench needs is bounded by
one run, and the JSON reports the peak (``peak_window_bytes``).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path


def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (0 when it does not exist); files that vanish meanwhile are
    skipped."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


class WindowDisk:
    """The window store of one benchmark, shared by the controller and every device.

    :meth:`run` measures its size every ``interval`` s in a thread while a run goes on and keeps the peak
    (:attr:`peak_bytes`); :meth:`clear` empties it.

    Args:
        store: the store's folder (made if missing).
        interval: seconds between two samples.
    """

    def __init__(self, store: Path, interval: float = 1.0) -> None:
        self.store = Path(store)
        self.store.mkdir(parents=True, exist_ok=True)
        self.interval = interval
        self.peak_bytes = 0

    def share(self, home: Path) -> None:
        """Make ``<home>/windows`` a link to the store (a folder there, from an earlier bench, is removed)."""
        link = Path(home) / "windows"
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(self.store.resolve(), target_is_directory=True)

    def total(self) -> int:
        """Bytes in the store now."""
        return tree_bytes(self.store)

    def run(self) -> _Sampler:
        """A context manager around one run: samples :meth:`total` until it exits (and once more then), then
        removes the run's windows (:meth:`clear`)."""
        return _Sampler(self)

    def clear(self) -> None:
        """Remove every window file of the benchmark (the store itself stays: the homes link to it)."""
        for entry in self.store.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


class _Sampler:
    def __init__(self, disk: WindowDisk) -> None:
        self.disk = disk
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.disk.peak_bytes = max(self.disk.peak_bytes, self.disk.total())
            if self._stop.wait(self.disk.interval):
                return

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.disk.peak_bytes = max(self.disk.peak_bytes, self.disk.total())
        self.disk.clear()

"""The disk a benchmark's window files take: sampled while it runs, removed when a run ends.

Every plan variant of ``homering bench cluster`` slices its own windows (the controller slices
them all to hash them, each agent slices or downloads its own), and a window cache is pruned
only of files older than :data:`~homering.transport.windows.CACHE_MIN_AGE_S`. At 32B one run's
windows take about twice the model (the controller's copy and the agents'), so the bench
removes them after each run: the disk it needs is bounded by one run, and the JSON reports the
peak (``peak_window_bytes``).
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
    """The window folders of one benchmark (``<home>/windows`` of the controller and of every device).

    :meth:`sampling` measures their total size every ``interval`` s in a thread while a run goes on and
    keeps the peak (:attr:`peak_bytes`); :meth:`clear` removes them.
    """

    def __init__(self, homes: list[Path], interval: float = 1.0) -> None:
        self.folders = [Path(h) / "windows" for h in homes]
        self.interval = interval
        self.peak_bytes = 0

    def total(self) -> int:
        """Bytes in the window folders now."""
        return sum(tree_bytes(f) for f in self.folders)

    def run(self) -> _Sampler:
        """A context manager around one run: samples :meth:`total` until it exits (and once more then), then
        removes the run's windows (:meth:`clear`)."""
        return _Sampler(self)

    def clear(self) -> None:
        """Remove every window file of the benchmark (the folders are made again on use)."""
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)


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

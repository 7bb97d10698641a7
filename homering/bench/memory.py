"""What the benchmarked processes hold in memory, and a cold page cache to start each run from.

``homering bench cluster`` reports memory pressure as the peak anonymous RSS (``RssAnon`` in
``/proc/PID/status``) of each device's process: page cache is not pressure, the kernel can take it back.
"""

from __future__ import annotations

import threading
from pathlib import Path

from homering.engine.pages import WindowPages


def rss_anon(pid: int) -> int:
    """Anonymous resident memory of a process, bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler:
    """Samples the ``RssAnon`` of some processes every ``interval`` s in a thread; keeps each one's peak."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2):
        self.pids = pids
        self.interval = interval
        self.peak = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_anon(pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def drop_page_cache(paths: list[Path]) -> None:
    """Drop every regular file under ``paths`` from the page cache (:meth:`WindowPages.release`)."""
    for root in paths:
        for p in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
            try:
                pages = WindowPages(p)
            except OSError:
                continue
            try:
                pages.release()
            finally:
                pages.close()

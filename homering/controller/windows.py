"""The controller's window store: the window files of the plan in force and the probe windows it serves.

The controller slices every plan's windows itself (or finds them in the window cache), writes each
file's SHA-256 and size into the plan, and serves exactly those files, plus the probe windows agents
without the model profile with (:mod:`homering.transport.windows` is the cache and the download
client; the API's window routes ask :meth:`WindowStore.window_file`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from homering.errors import HomeringError
from homering.models.gguf_info import ModelInfo
from homering.models.slicing import Role, WindowSpec, slice_window
from homering.transport import windows as dist
from homering.wire import Plan, WindowFile

log = logging.getLogger("homering.controller")


class WindowStore:
    """Window files by SHA-256: the current plan's and the probe windows sliced so far.

    Args:
        model_path: the GGUF model the windows are sliced from.
    """

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self.info: ModelInfo | None = None
        """The model's header facts (set once read: probe windows need them)."""
        self._plan_files: dict[str, Path] = {}  # sha256 -> window file of the current plan (served)
        self._probe_files: dict[str, Path] = {}  # sha256 -> probe window file (served)
        self._probe_lock = asyncio.Lock()

    @property
    def fingerprint(self) -> str | None:
        """The model's fingerprint (None until its header is read)."""
        return self.info.fingerprint if self.info is not None else None

    async def prepare(self, plan: Plan) -> None:
        """Slice (or find in the window cache) every window of ``plan``, write each file's SHA-256 and size
        into the plan, and serve those files from now on (instead of the previous plan's).

        Raises:
            HomeringError: a window cannot be sliced (ModelError) or read.
        """

        def slice_all() -> dict[str, Path]:
            files = {}
            for agent in plan.ring:
                for w in agent.windows:
                    spec = WindowSpec(w.start, w.end, Role.for_range(w.start, w.end, plan.n_layers))
                    path = slice_window(self.model_path, spec, progress=False, model_fp=plan.model_fingerprint)
                    w.sha256, w.size = dist.file_sha256(path), path.stat().st_size
                    files[w.sha256] = path
            dist.prune_cache(
                set(files.values()) | set(self._probe_files.values()),
                spare_bytes=sum(p.stat().st_size for p in files.values()),
            )
            return files

        t0 = time.perf_counter()
        try:
            self._plan_files = await asyncio.to_thread(slice_all)
        except OSError as exc:
            raise HomeringError(f"cannot read a window file: {exc}") from None
        log.info(
            "windows of plan %s sliced and hashed in %.2f s (%d files, %.1f MB)",
            plan.plan_id,
            time.perf_counter() - t0,
            len(self._plan_files),
            sum(p.stat().st_size for p in self._plan_files.values()) / 1e6,
        )

    def window_file(self, sha256: str) -> Path | None:
        """The file with this hash when it may be served (a window of the current plan or a probe window)."""
        return self._plan_files.get(sha256) or self._probe_files.get(sha256)

    async def probe_window(self, label: str) -> WindowFile | None:
        """Slice a probe window (``<start>-<end>-<role>``, see
        :func:`~homering.profiler.compute.possible_probe_specs`) for an agent without the model, and serve
        it from now on; None for any other window."""
        from homering.profiler.compute import possible_probe_specs

        try:
            start, end, role = label.split("-")
            spec = WindowSpec(int(start), int(end), Role(role))
        except ValueError:
            return None
        if self.info is None or spec not in possible_probe_specs(self.info):
            return None

        def slice_one() -> tuple[Path, str]:
            path = slice_window(self.model_path, spec, progress=False, model_fp=self.fingerprint)
            return path, dist.file_sha256(path)

        async with self._probe_lock:  # agents profiling at once ask for the same windows
            path, digest = await asyncio.to_thread(slice_one)
        self._probe_files[digest] = path
        return WindowFile(start=spec.start, end=spec.end, role=spec.role.value, sha256=digest, size=path.stat().st_size)

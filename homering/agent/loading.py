"""Applying a plan: this agent's window files (sliced here, or downloaded), its LayerWindows, its link.

Windows: an agent with the model slices its windows itself; one without downloads them from the
controller (:mod:`homering.transport.windows`). Either way every window file is checked against the plan's
SHA-256. Plans are applied one at a time, in the order offered (:class:`PlanLoader`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from homering.agent.ring import Ring
from homering.engine import streaming
from homering.engine.pages import WindowPages, trim_heap
from homering.engine.window import LayerWindow
from homering.errors import HomeringError
from homering.models.gguf_info import fingerprint
from homering.models.slicing import Role, WindowSpec, slice_window
from homering.tasks import Tasks
from homering.transport.links import connect_link
from homering.transport.windows import WindowClient, cached, matches, plan_files, prune_cache, reachable_url, remove
from homering.wire import AgentState, Plan, WindowAssignment
from homering.wire.security import ClusterKey

log = logging.getLogger("homering.agent")

Report = Callable[..., Awaitable[None]]
"""``await report(state, plan_id=None, detail=None)``: publish this agent's status."""
OpenWindow = Callable[[Path, WindowAssignment, Role, Plan, int, int | None, bool], LayerWindow]
"""``open_window(path, assignment, role, plan, threads, stream_from, prefetch_experts)``: load one window (see
:func:`open_window`)."""


class ModelSource:
    """Where this agent's model bytes come from: its own copy of the model, or the controller's downloads.

    Args:
        broker_host: the broker's host (the controller's API is taken to be there when it announces a
            loopback URL, see :func:`~homering.transport.windows.reachable_url`).
        model: this device's copy of the controller's model, when it is not at the controller's path.
        local_model: use a local model file at all; False: always download.
        api_key: the controller's API key, for downloads (None: none sent).
        controller_url: the controller's API base URL [default: the one it announces].
    """

    def __init__(
        self,
        broker_host: str,
        *,
        model: Path | None = None,
        local_model: bool = True,
        api_key: str | None = None,
        controller_url: str | None = None,
    ) -> None:
        self.broker_host = broker_host
        self.model = Path(model) if model is not None else None
        self.local_model = local_model
        self.api_key = api_key
        self.controller_url = controller_url

    def local(self, model_path: str, fp: str) -> Path | None:
        """This device's copy of the model with fingerprint ``fp``: ``model``, else the controller's path
        when that file is here; None when there is none (or ``local_model`` is off)."""
        if not self.local_model:
            return None
        path = self.model or Path(model_path)
        if not path.is_file():
            return None
        if fingerprint(path) != fp:
            log.warning("model file %s is not the controller's model (fingerprint differs): not used", path)
            return None
        return path

    def window_client(self, api: str | None, what: str) -> WindowClient:
        """A client for the controller's window downloads (``api``: the URL the controller announces).

        Raises:
            HomeringError: the controller serves no windows (it runs without --api-port).
        """
        url = self.controller_url or (reachable_url(api, self.broker_host) if api else None)
        if url is None:
            raise HomeringError(
                f"{what}: this device has no copy of the model and the controller serves no "
                f"windows (start it with --api-port, or give this agent --model)"
            )
        return WindowClient(url, self.api_key)


def open_window(
    path: Path,
    w: WindowAssignment,
    role: Role,
    plan: Plan,
    threads: int,
    stream_from: int | None = None,
    prefetch_experts: bool = False,
) -> LayerWindow:
    """Load window ``w`` of ``plan`` from ``path`` with llama.cpp (``threads`` decode threads); its layers from
    ``stream_from`` on stream from disk (:mod:`homering.engine.streaming`), None: none; ``prefetch_experts``:
    a MoE's routed experts are read on demand (:mod:`homering.engine.prefetch`)."""
    return LayerWindow(
        path,
        takes_tokens=role.takes_tokens,
        gives_logits=role.gives_logits,
        n_ctx=plan.n_ctx,
        n_seq_max=plan.n_parallel,
        n_batch=plan.n_batch,
        n_threads=threads,
        n_gpu_layers=w.gpu_layers,
        stream_from=stream_from,
        prefetch_experts=prefetch_experts,
    )


class PlanLoader:
    """Applies the plans the controller vouches for, one at a time, and holds the loaded one (:attr:`ring`).

    Args:
        name: this agent's name.
        threads: llama.cpp threads per window.
        key: the cluster key (the link to the successor must prove it).
        source: where the window files come from.
        release: drop windows from the page cache after use (True/False), or as the plan says (None).
        tasks: the agent's background tasks.
        report: publishes this agent's status (loading, ready, error, online).
        controller_api: the API URL the controller announces (for downloads), or None.
        open_window: loads one window [default: :func:`open_window`].
    """

    def __init__(
        self,
        name: str,
        *,
        threads: int,
        key: ClusterKey | None,
        source: ModelSource,
        release: bool | None,
        tasks: Tasks,
        report: Report,
        controller_api: Callable[[], str | None],
        open_window: OpenWindow = open_window,
    ) -> None:
        self.name = name
        self.threads = threads
        self.key = key
        self.source = source
        self.release = release
        self._tasks = tasks
        self._report = report
        self._controller_api = controller_api
        self._open_window = open_window
        self.ring: Ring | None = None  # read by link threads and generation loops; replaced here only
        self._offered = 0  # plans offered so far; a load whose number is not the latest stops
        self._task: asyncio.Task[None] | None = None

    def offer(self, plan: Plan) -> asyncio.Task[None]:
        """Load ``plan`` once the loads offered before have stopped; the task that does it."""
        self._offered += 1
        self._task = self._tasks.spawn(self._apply(plan, self._offered, self._task), name=f"plan {plan.plan_id}")
        return self._task

    async def _apply(self, plan: Plan, seq: int, previous: asyncio.Task[None] | None) -> None:
        """Load ``plan`` (the ``seq``-th offered), after ``previous`` (an earlier load) has stopped.

        Loads are never cancelled midway (their threads cannot be): a load whose plan has been replaced
        meanwhile stops at its next step and closes what it loaded. Whatever fails is logged and reported
        in this agent's status (``error``).
        """
        if previous is not None:
            await asyncio.wait([previous])  # it reported its own failure, if any

        def superseded() -> bool:
            return seq != self._offered

        if superseded():
            return
        old, self.ring = self.ring, None
        if old is not None:  # requests in flight end with "interrupted"; the controller resumes them
            await asyncio.to_thread(old.shutdown)
        position = plan.position(self.name)
        if position is None:
            await self._report(AgentState.ONLINE, plan.plan_id, "not in the plan")
            return
        await self._report(AgentState.LOADING, plan.plan_id)
        try:
            ring = await self._load(plan, position, superseded)
        except (HomeringError, ConnectionError, OSError, ValueError) as exc:
            if not superseded():
                log.error("cannot load plan %s: %s", plan.plan_id, exc)
                await self._report(AgentState.ERROR, plan.plan_id, str(exc))
            return
        except Exception as exc:  # a bug: say so, never stay "loading"
            log.exception("cannot load plan %s", plan.plan_id)
            if not superseded():
                await self._report(AgentState.ERROR, plan.plan_id, f"internal error: {exc!r}")
            return
        if ring is None:
            return
        self.ring = ring
        log.info(
            "plan %s loaded: windows %s, %s",
            plan.plan_id,
            [(w.start, w.end) for w in plan.ring[position].windows],
            "head" if ring.is_head else f"next {plan.ring[(position + 1) % len(plan.ring)].name}",
        )
        await self._report(AgentState.READY, plan.plan_id)
        try:  # the plan's windows stay, and as many bytes of recent others
            await asyncio.to_thread(
                prune_cache, plan_files(plan), spare_bytes=sum(w.size or 0 for a in plan.ring for w in a.windows)
            )
        except OSError as exc:
            log.warning("could not prune the window cache: %s", exc)

    async def _load(self, plan: Plan, position: int, superseded: Callable[[], bool]) -> Ring | None:
        """Open this agent's windows and the link to its successor; None when the plan was replaced meanwhile."""
        ring = None
        try:
            trim_heap()  # the previous plan's contexts
            windows = await asyncio.to_thread(self._open_windows, plan, position)
            me = plan.ring[position]
            release = self.release if self.release is not None else me.release
            pages = None
            # Prefetch (and release) where the plan streams whole windows, or when --release asks: an
            # overflowing device reads its streamed layers on demand (a prefetched 3.4 GB window in a 6 GB
            # cgroup evicted its kept layers: 18.1 s/token against 9.5 on home4-32b-tight), and a resident
            # one has its windows. macOS has no fadvise: no prefetch there.
            if len(windows) > 1 and (me.mode == "stream" or release) and WindowPages.supported:
                pages = [
                    WindowPages(w.path, skip=streaming.unread_span(w.path, gives_logits=w.gives_logits))
                    for w in windows
                ]
            ring = Ring(plan, position, windows, release=release, pages=pages)
            if len(plan.ring) > 1 and not superseded():
                nxt = plan.ring[(position + 1) % len(plan.ring)]
                sock = await asyncio.to_thread(connect_link, nxt.host, nxt.data_port, key=self.key, give_up=superseded)
                ring.connect(sock)
            if superseded():
                ring.close()
                return None
            return ring
        except BaseException:
            if ring is not None:
                ring.close()
            raise

    def _open_windows(self, plan: Plan, position: int) -> list[LayerWindow]:
        """Get this agent's window files (see :meth:`_window_file`) and open them (a worker thread).

        Raises:
            HomeringError: a window file cannot be had (no model here and no download, or a refused or
                corrupted download); llama.cpp cannot load a window.
        """
        local = self.source.local(plan.model_path, plan.model_fingerprint)
        client = None
        paths: list[Path] = []
        try:
            for w in plan.ring[position].windows:
                spec = WindowSpec(w.start, w.end, Role.for_range(w.start, w.end, plan.n_layers))
                path = self._window_file(plan, w, spec, local)
                if path is None:  # download
                    assert w.sha256 is not None  # (_window_file slices a window without a hash, or raises)
                    if client is None:
                        client = self.source.window_client(
                            self._controller_api(), f"model file {plan.model_path} is not on this device"
                        )
                    path = client.fetch(w.sha256, w.size, spec.label())
                paths.append(path)
        finally:
            if client is not None:
                client.close()
        out: list[LayerWindow] = []
        # an overflowing MoE device leaves its experts to the page cache and reads the routed ones it lacks
        experts = plan.ring[position].mode == "overflow"
        try:
            for w, path, first in zip(plan.ring[position].windows, paths, self._stream_starts(plan, position, paths)):
                role = Role.for_range(w.start, w.end, plan.n_layers)
                out.append(self._open_window(path, w, role, plan, self.threads, first, experts))
            return out
        except BaseException:
            for window in out:
                window.close()
            raise

    def _stream_starts(self, plan: Plan, position: int, paths: list[Path]) -> list[int | None]:
        """Where each window's streamed tail begins: the plan's ``keep_bytes`` for a device in overflow mode
        (unless this agent runs with ``--no-release``), else nothing streams.

        Raises:
            HomeringError: a window file whose layers cannot stream one at a time.
        """
        me = plan.ring[position]
        if me.mode != "overflow" or me.keep_bytes is None or self.release is False or not streaming.SUPPORTED:
            return [None] * len(paths)
        sizes = [[hi - lo for lo, hi in streaming.layer_spans(p)] for p in paths]
        starts = streaming.stream_starts(sizes, me.keep_bytes)
        kept = sum(sum(s[: len(s) if f is None else f]) for s, f in zip(sizes, starts))
        log.info(
            "overflow: keeping %.2f GiB of %.2f GiB of layers in memory, streaming the rest every token",
            kept / 2**30,
            sum(map(sum, sizes)) / 2**30,
        )
        return starts

    @staticmethod
    def _window_file(plan: Plan, w: WindowAssignment, spec: WindowSpec, local: Path | None) -> Path | None:
        """The checked file of window ``w``, or None when it must be downloaded.

        In order: a downloaded copy in the cache (by hash, checked); the window sliced from the local model,
        checked against the plan's hash (a mismatching slice, e.g. a corrupted cache file, is sliced again
        once); else None. A plan without hashes (an older controller) needs the model here.
        """
        label = spec.label()
        if w.sha256 is None:
            if local is None:
                raise HomeringError(f"model file {plan.model_path} is not on this device")
            return slice_window(local, spec, progress=False, model_fp=plan.model_fingerprint)
        hit = cached(w.sha256, w.size, label)
        if hit is not None:
            return hit
        if local is None:
            return None
        for attempt in range(2):
            path = slice_window(local, spec, progress=False, model_fp=plan.model_fingerprint)
            if matches(path, w.sha256, w.size):
                return path
            if spec.role is Role.WHOLE:
                break  # the model file itself: nothing to slice again
            log.warning(
                "window %s sliced here (%s) does not match the plan's sha256: %s",
                label,
                path,
                "slicing it again" if attempt == 0 else "it will be downloaded",
            )
            remove(path)
        return None

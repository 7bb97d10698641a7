"""``homering controller``: tracks agents, plans, and turns user requests into head jobs.

The controller keeps no state that the broker does not also hold: agents' profiles and statuses
are retained messages, and so is the plan it publishes; a restarted controller adopts the retained
plan when its agents still serve it. It announces the model (agents measure their device for it),
probes every agent's link to the head, plans with the measured profiles, and re-plans when agents
join (at a request boundary) or are lost (at once: the requests in flight resume on the new ring,
:mod:`.serving`). It tokenizes requests, refuses prompts that do not fit the context, and hands the
token ids to the head, which streams the answer straight to the client's topic. With an API port it
serves the OpenAI-compatible API and the plan's window files (:mod:`homering.transport.windows`).

This module is the composition root. :class:`Controller` builds the parts, each owning its state:

* :mod:`.membership`: agents' profiles, statuses, heartbeats; who is live, joins, is lost;
* :mod:`.planning`: the state machine (:class:`~homering.wire.ControllerState`) and the plan in force;
  :mod:`.replanning` drives it (bring-up, adopt, plan, load, re-plan); :mod:`.links` probes links;
* :mod:`.admission`: KV sequences, the queue, ready generations;
* :mod:`.requests` (one :class:`~.requests.RequestRun` per request) and :mod:`.serving` (submit, resume);
* :mod:`.windows`: the window files it serves.

It wires them to the MQTT :class:`~homering.transport.bus.Bus`, runs them, and is the API's
:class:`~homering.api.view.ClusterView`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import aiomqtt
import uvicorn

from homering.api.app import serve
from homering.api.metrics import Metrics
from homering.controller.admission import Admission
from homering.controller.announce import STATS_INTERVAL_S, Announcer
from homering.controller.changes import Changes
from homering.controller.links import AgentLost, LinkProber
from homering.controller.loading import PlanLoader
from homering.controller.membership import Membership
from homering.controller.planning import Planning, PlanSettings
from homering.controller.replanning import Replanner
from homering.controller.requests import RequestError
from homering.controller.serving import RequestService
from homering.controller.windows import WindowStore
from homering.engine.drafting import Speculative
from homering.engine.tokenizer import Tokenizer
from homering.errors import HomeringError
from homering.integrations.homeassistant import controller_configs, publish_discovery
from homering.models.gguf_info import ModelInfo, inspect_gguf
from homering.models.support import check_splittable
from homering.planner import DEFAULT_BATCH
from homering.tasks import Tasks
from homering.transport import mqtt
from homering.transport.bus import Bus, Received
from homering.wire import (
    MAX_PAYLOAD,
    AgentProfile,
    AgentStats,
    AgentStatus,
    ClusterKey,
    Codec,
    ControllerState,
    ControllerStats,
    GenerateRequest,
    LinkReport,
    MalformedMessage,
    Plan,
    StreamEvent,
    Topics,
    WindowFile,
)

__all__ = [
    "AgentLost",
    "Controller",
    "DEFAULT_BATCH",
    "DEFAULT_PARALLEL",
    "DEFAULT_QUEUE",
    "RequestError",
    "STATS_INTERVAL_S",
]

DEFAULT_PARALLEL = 4  # requests served at once (KV sequences per window)
DEFAULT_QUEUE = 16  # requests that may wait for a sequence
IDENTIFIER = "homering-controller"  # the MQTT client id (one controller per broker)

log = logging.getLogger("homering.controller")


class Controller:
    """The cluster's coordinator.

    Args:
        broker: the MQTT broker.
        model_path: the GGUF model every agent slices its windows from.
        n_agents: agents to wait for before planning.
        n_ctx: context size (tokens) of every window's KV cache.
        join_timeout: seconds to wait for the agents, and again for them to load.
        planner: a name from :data:`homering.planner.PLANNERS`.
        rounds: plan with exactly this many rounds k (must divide the layer
            count) [default: the planner chooses among every k].
        n_batch: micro-batch size in tokens: a prompt enters the ring in chunks
            of this many tokens, back to back, so the agents work on different
            chunks at once (PRIMA.CPP's pipelined prefill); it is also every
            window's llama.cpp n_batch/n_ubatch, which sizes its compute buffer.
        n_parallel: requests served at once; each owns a KV sequence of
            ``n_ctx`` tokens in every window (memory grows with it).
        max_queue: requests that may wait for a sequence; more get a 429.
        api: serve the OpenAI-compatible HTTP API on this ``(host, port)``.
        api_key: require ``Authorization: Bearer <api_key>`` on the API (None: open).
        ha_discovery: announce the controller to Home Assistant (MQTT discovery).
        key: the cluster key (:mod:`homering.wire.security`): plans, jobs, probes and the status go out
            signed, and requests must be signed [default: an open cluster].
        speculative: the default speculative decoding of requests (``--draft``; :mod:`homering.engine.drafting`).
    """

    def __init__(
        self,
        broker: mqtt.BrokerURL,
        model_path: Path,
        *,
        n_agents: int,
        n_ctx: int = 2048,
        join_timeout: float = 60.0,
        planner: str = "halda",
        rounds: int | None = None,
        n_batch: int = DEFAULT_BATCH,
        n_parallel: int = DEFAULT_PARALLEL,
        max_queue: int = DEFAULT_QUEUE,
        api: tuple[str, int] | None = None,
        api_key: str | None = None,
        ha_discovery: bool = False,
        key: ClusterKey | None = None,
        speculative: Speculative | None = None,
    ):
        self.broker, self.model_path, self.n_ctx, self.n_parallel = broker, Path(model_path), n_ctx, n_parallel
        self.api, self.api_key, self.ha_discovery, self.started = api, api_key, ha_discovery, time.time()
        self.settings = PlanSettings(
            self.model_path,
            n_agents,
            n_ctx,
            n_batch,
            n_parallel,
            planner,
            rounds,
            join_timeout,
            _draft_bytes(speculative),
        )
        self.changes, self.tasks = Changes(), Tasks("controller")
        self.bus = Bus(
            broker, Codec(key), identifier=IDENTIFIER, will=self._will, keepalive=5, on_message=self.changes.notify
        )
        self.membership = Membership()
        self.admission = Admission(n_parallel, max_queue)
        self.planning = Planning(self.admission, self.changes.notify)
        self.windows = WindowStore(self.model_path)
        self.metrics = Metrics(self)
        self.profiles, self.statuses = self.membership.profiles, self.membership.statuses  # the same dicts
        self.agent_stats, self.sequences = self.membership.agent_stats, self.admission.sequences
        self.speculative = speculative
        self._build()

    def _build(self) -> None:
        """The parts that act: requests, announcements, link probes, plan loading, re-planning; the routes."""
        s, bus, planning, m, changes = self.settings, self.bus, self.planning, self.membership, self.changes
        self.requests = RequestService(s, bus, self.tasks, planning, m, changes, self.metrics)
        self.requests.speculative = self.speculative
        self.announcer = Announcer(bus, planning, self.windows, s, api_url=self.api_url, stats=self.stats)
        self.probes = LinkProber(bus, m, changes, self.announcer.progress)
        publish = self.announcer.publish_status
        self.loader = PlanLoader(s, bus, planning, m, self.windows, self.probes, changes, publish)
        self.replanner = Replanner(s, self.loader, planning, m, self.requests, changes, publish)
        self._route()

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        """Plan once the agents are in, then serve requests until cancelled.

        Raises:
            HomeringError: the broker is unreachable at start, the agents did
                not join or could not load their windows in time.
        """
        info = await self._read_model()
        api = await self._start_api() if self.api else None
        connection = asyncio.create_task(self.bus.run())  # not one of self.tasks: its failure ends run()
        try:
            await self._connected(connection)
            if self.ha_discovery and self.bus.client is not None:
                await publish_discovery(self.bus.client, controller_configs())
            self.tasks.spawn(self.announcer.publish_stats(), name="controller stats")
            self.tasks.spawn(self.membership.watch_loop(), name="loop watch")
            await self.replanner.bring_up(info)
            maintain = asyncio.create_task(self.replanner.maintain(info))
            try:
                done, _ = await asyncio.wait([connection, maintain], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                maintain.cancel()
        finally:
            connection.cancel()  # a clean exit says "offline" itself (the bus's leave hook): no will is sent
            with contextlib.suppress(asyncio.CancelledError, HomeringError):
                await connection
            self.tasks.cancel_all()
            if api is not None:
                server, serving = api
                server.should_exit = True
                if serving is not None:
                    await serving

    async def _read_model(self) -> ModelInfo:
        """Read the model's header and tokenizer (off the event loop).

        Raises:
            HomeringError: the micro-batch's hidden states do not fit one frame.
            UnsupportedModel: an architecture homering cannot split (before any agent hears of the model).
        """
        check_splittable(self.model_path)
        info = inspect_gguf(self.model_path)
        n_batch = self.settings.n_batch
        if n_batch * info.n_embd * 4 > MAX_PAYLOAD:  # a micro-batch's hidden states must fit one frame
            raise HomeringError(
                f"--batch {n_batch} is too large for this model: at most "
                f"{MAX_PAYLOAD // (info.n_embd * 4)} tokens of {info.n_embd} floats fit a frame"
            )
        self.windows.info = info
        self.membership.fingerprint = info.fingerprint
        tokenizer = await asyncio.to_thread(Tokenizer, self.model_path)
        await asyncio.to_thread(getattr, tokenizer, "max_token_bytes")  # read the vocabulary once, off the loop
        self.requests.tokenizer = tokenizer
        return info

    async def _connected(self, connection: asyncio.Task[None]) -> None:
        """Wait for the first broker connection.

        Raises:
            HomeringError: it failed.
        """
        up = asyncio.create_task(self.bus.connected.wait())
        done, _ = await asyncio.wait([connection, up], return_when=asyncio.FIRST_COMPLETED)
        if connection in done:
            up.cancel()
            connection.result()  # raises the connect error

    async def _start_api(self) -> tuple[uvicorn.Server, asyncio.Task[None] | None]:
        """Serve the OpenAI-compatible API (uvicorn) on this event loop."""
        assert self.api is not None
        host, port = self.api
        started = await serve(self, host, port)
        log.info("OpenAI-compatible API on %s", self.api_url)
        return started if isinstance(started, tuple) else (started, None)

    # ------------------------------------------------------------------ the bus
    def _route(self) -> None:
        bus, m = self.bus, self.membership
        bus.route(Topics.ALL_PROFILES, AgentProfile, lambda r: m.on_profile(r.message), newest=True)
        bus.route(Topics.ALL_STATUS, AgentStatus, self._on_status, newest=True)
        bus.route(Topics.REQUESTS, GenerateRequest, lambda r: self.tasks.spawn(self.requests.on_request(r.message)))
        bus.route(Topics.PLAN, Plan, lambda r: self.loader.on_retained_plan(r.message))
        bus.route(Topics.ALL_PROBE_RESULTS, LinkReport, lambda r: self.probes.on_report(r.message))
        bus.route(Topics.ALL_STREAMS, StreamEvent, self._on_stream)
        bus.route(Topics.ALL_STATS, AgentStats, lambda r: m.on_stats(r.message, retained=r.retained), newest=True)
        bus.on_connect(self._on_connect)
        bus.on_disconnect(m.disconnected)
        bus.on_leave(self.announcer.leave)

    def _on_status(self, r: Received) -> None:
        assert r.ref is not None and r.ref.name is not None  # matched homering/agents/+/status
        self.membership.on_status(r.ref.name, r.message, retained=r.retained)

    def _on_stream(self, r: Received) -> None:
        event: StreamEvent = r.message
        if r.ref is None or event.request_id != r.ref.name:
            raise MalformedMessage(f"a StreamEvent of {event.request_id} on another request's topic")
        self.requests.on_stream(event.request_id, event)

    async def _on_connect(self, reconnected: bool) -> None:
        """Publish the retained state again (a restarted broker lost it); ask for the events missed."""
        if self.planning.plan is not None:
            await self.bus.publish(Topics.PLAN, self.planning.plan, retain=True, wait=False)
        await self.announcer.publish_status(wait=False)
        self.membership.connected()
        if reconnected:
            self.requests.replay_all()

    def _will(self) -> aiomqtt.Will:
        return self.announcer.will()

    def stats(self) -> ControllerStats:
        """The controller's telemetry now."""
        return ControllerStats(
            model=self.model_path.name,
            requests_in_flight=len(self.in_flight),
            queue_depth=self.sequences.queue_depth,
            n_parallel=self.n_parallel,
            tokens_generated=self.metrics.tokens_total,
        )

    # ------------------------------------------------------------------ the API's view (ClusterView)
    @property
    def api_url(self) -> str | None:
        """The API's base URL (``…/v1``) as agents reach it on this host; None without an API."""
        if not self.api:
            return None
        host, port = self.api
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{shown}:{port}/v1"

    @property
    def model_id(self) -> str:
        """The model's name in the API: the GGUF file name without ``.gguf``."""
        return self.model_path.name.removesuffix(".gguf")

    @property
    def fingerprint(self) -> str | None:
        """The model's (None until read)."""
        return self.windows.fingerprint

    @property
    def plan(self) -> Plan | None:
        """The plan in force (being loaded while ``PLANNING``)."""
        return self.planning.plan

    @property
    def state(self) -> ControllerState:
        """The state machine's state (:class:`~homering.controller.planning.Planning`)."""
        return self.planning.state

    @property
    def detail(self) -> str | None:
        """What the state waits for, or why it failed."""
        return self.planning.detail

    @property
    def ready(self) -> bool:
        """A loaded plan is intact and serves requests (False while re-planning or after a loss)."""
        return self.planning.ready

    @property
    def links(self) -> dict[str, tuple[float, float]]:
        """Agent -> (one-way ms, Mbit/s) to the head, measured when the plan in force was made."""
        return self.planning.links

    @property
    def in_flight(self) -> dict[str, int]:
        """Request id -> KV sequence of the requests in flight."""
        return self.requests.runs.in_flight

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer (None until read)."""
        return self.requests.tokenizer

    @property
    def measured_ms_per_token(self) -> float | None:
        """Of the last request that decoded 2+ tokens."""
        return self.requests.measured_ms_per_token

    def live_agents(self) -> list[AgentProfile]:
        """Agents with a profile whose status is not offline/error and whose heartbeat goes on."""
        return self.membership.live_agents()

    def submit(self, req: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        """See :meth:`~homering.controller.serving.RequestService.submit`."""
        return self.requests.submit(req)

    def window_file(self, sha256: str) -> Path | None:
        """The file with this hash when it may be served (a window of the current plan or a probe window)."""
        return self.windows.window_file(sha256)

    async def probe_window(self, label: str) -> WindowFile | None:
        """Slice a probe window for an agent without the model (see :class:`WindowStore`)."""
        return await self.windows.probe_window(label)


def _draft_bytes(s: Speculative | None) -> int:
    """The size of the draft model that requests use by default (0: none, or not a file here)."""
    if s is None or s.draft != "model" or not s.model_path:
        return 0
    path = Path(s.model_path)
    return path.stat().st_size if path.is_file() else 0

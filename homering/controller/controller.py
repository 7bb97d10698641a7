"""``homering controller``: tracks agents, plans, and turns user requests into head jobs.

The controller keeps no state that the broker does not also hold: agents'
profiles and statuses are retained messages, and so is the plan it publishes;
a restarted controller adopts the retained plan when its agents still serve it.
It announces the model (agents measure their device for it), probes every
agent's link to the head, plans with the measured profiles, and re-plans when
agents join (at a request boundary) or are lost (at once). It tokenizes
requests (rendering chats with the model's template), rejects prompts that do
not fit the context, and hands the token ids to the head, which streams the
answer straight to the client's topic.

Fault tolerance: an agent counts as lost when its status goes ``offline``
(its MQTT last will) or its heartbeat (:class:`AgentStats`, every second)
stops for :data:`LOST_AFTER_S`; a head whose ring breaks ends its requests
with ``interrupted``. The controller re-plans over the agents left and
resumes every request in flight on the new ring: the head replays prompt +
tokens so far to rebuild the KV caches and goes on (Petals' recovery by
replay), so the client's stream only pauses. A broker outage is survived by
reconnecting with backoff; stream events lost meanwhile are published again
by the head (:class:`StreamReplay`).

Window distribution: the controller slices every plan's windows itself and
puts each file's SHA-256 and size in the plan; with an API port it serves
those files, and the probe windows agents profile with, to agents that do not
have the model (:mod:`homering.transport.windows`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt

from homering.api.metrics import Metrics
from homering.transport import mqtt
from homering.transport import windows as dist
from homering.integrations.homeassistant import controller_configs, publish_discovery
from homering.controller.admission import QueueFull, Sequences
from homering.wire import (
    MAX_PAYLOAD, AgentProfile, AgentStats, AgentStatus, CancelJob, ControllerStats, ControllerStatus, GenerateJob,
    GenerateRequest, LinkProbe, LinkReport, MalformedMessage, Plan, StreamEvent, StreamReplay, Topics, WindowFile,
)
from homering.transport.streams import StreamOrder
from homering.wire.security import ClusterKey, NewestState
from homering.engine.tokenizer import Tokenizer
from homering.errors import HomeringError
from homering.models.gguf_info import ModelInfo, inspect_gguf
from homering.models.slicing import Role, WindowSpec, slice_window
from homering.controller.plans import head_of, make_plan
from homering.planner import DEFAULT_BATCH
from homering.planner.model import PlanError, shape_from_gguf

DEFAULT_PARALLEL = 4  # requests served at once (KV sequences per window)
DEFAULT_QUEUE = 16  # requests that may wait for a sequence
STATS_INTERVAL_S = 2.0
OFFLINE_GRACE_S = 0.5  # a last will counts once our own connection outlived it (a stopping broker sends them all)
LOST_AFTER_S = 3.5  # an agent whose heartbeat (stats, every 1 s) stops this long counts as lost
LOOP_TICK_S = 0.25  # how often the controller checks that its own event loop runs
LOOP_STALL_S = 1.0  # a tick this late means the loop was blocked: heartbeats were not read, not missing
JOIN_HOLD_S = 2.0  # a joining agent must stay up this long before it is planned in (doubles per recent loss)
JOIN_HOLD_MAX_S = 60.0
FLAP_WINDOW_S = 300.0  # losses within this window count against a flapping agent

log = logging.getLogger("homering.controller")

LIVE_STATES = {"online", "loading", "ready"}
PROBE_TIMEOUT_S = 15.0
SETTLE_S = 0.5  # wait for a burst of joins/leaves to settle before re-planning


class RequestError(HomeringError):
    """A request the controller refuses; ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, *, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class AgentLost(HomeringError):
    """An agent of the plan being loaded was lost: plan again over the others."""


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
    """

    def __init__(self, broker: mqtt.BrokerURL, model_path: Path, *, n_agents: int, n_ctx: int = 2048,
                 join_timeout: float = 60.0, planner: str = "halda", rounds: int | None = None,
                 n_batch: int = DEFAULT_BATCH, n_parallel: int = DEFAULT_PARALLEL,
                 max_queue: int = DEFAULT_QUEUE, api: tuple[str, int] | None = None, api_key: str | None = None,
                 ha_discovery: bool = False, key: ClusterKey | None = None):
        self.broker = broker
        self.api_key = api_key
        self.key = key
        self._state_order = NewestState()  # replay check of the agents' signed retained state
        self.n_parallel = n_parallel
        self.sequences = Sequences(n_parallel, max_queue)
        self.api = api
        self.ha_discovery = ha_discovery
        self.metrics = Metrics(self)
        self.tokenizer: Tokenizer | None = None
        self._tokenizing = asyncio.Lock()  # one request at a time in the tokenizer's thread
        self.agent_stats: dict[str, AgentStats] = {}
        self.links: dict[str, tuple[float, float]] = {}  # agent -> (ms, Mbit/s) to the head, at plan time
        self.detail: str | None = None
        self.measured_ms_per_token: float | None = None  # of the last request that decoded 2+ tokens
        self.started = time.time()
        self._streams: dict[str, asyncio.Queue] = {}  # request id -> its events (requests this process serves)
        self._abandoned: set[str] = set()  # cancelled requests whose head has not stopped yet
        self.n_batch = n_batch
        self.model_path = Path(model_path)
        self.n_agents = n_agents
        self.n_ctx = n_ctx
        self.join_timeout = join_timeout
        self.planner = planner
        self.rounds = rounds
        self.profiles: dict[str, AgentProfile] = {}
        self.statuses: dict[str, AgentStatus] = {}
        self.plan: Plan | None = None
        self._ready = False
        self._ready_gen = 0  # counts the plans that became ready (admission order across re-plans)
        self.draining = False  # agents joined: new requests wait for the next plan, running ones finish
        self._waiting: dict[str, int] = {}  # request id -> _ready_gen when it began waiting for a plan
        self.state = "waiting"
        self.fingerprint: str | None = None
        self.planned_members: frozenset | None = None
        self.in_flight: dict[str, int] = {}  # request id -> its KV sequence
        self._reports: dict[str, LinkReport] = {}
        self._changed = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._tasks: set[asyncio.Task] = set()
        self._connected = asyncio.Event()
        self._connected_at = 0.0
        self._loop_tick: float | None = None  # the last tick of _watch_loop (None: not running)
        self._loop_stalled_at = 0.0  # when the loop came back from its last block
        self._disconnected_at = -1.0  # when our broker connection last dropped (monotonic)
        self._last_seen: dict[str, float] = {}  # agent -> monotonic time of its last message
        self._live_since: dict[str, float] = {}  # agent -> when it (re)appeared live
        self._offline_at: dict[str, float] = {}  # agent -> when its "offline" status arrived
        self._losses: dict[str, list[float]] = {}  # agent -> times it was lost (hysteresis)
        self._orders: dict[str, StreamOrder] = {}  # request id -> its stream's order (this process's requests)
        self._heads: dict[str, str] = {}  # request id -> the head serving its current attempt
        self._retained_plan: Plan | None = None
        self._broken: str | None = None  # why the current ring must be re-planned now (a head's report)
        self._plan_failed: tuple[float, str] | None = None  # (when, why) the last re-plan failed
        self.info: ModelInfo | None = None
        self._plan_files: dict[str, Path] = {}  # sha256 -> window file of the current plan (served)
        self._probe_files: dict[str, Path] = {}  # sha256 -> probe window file (served)
        self._probe_lock = asyncio.Lock()

    async def run(self) -> None:
        """Plan once the agents are in, then serve requests until cancelled.

        Raises:
            HomeringError: the broker is unreachable at start, the agents did
                not join or could not load their windows in time.
        """
        info = inspect_gguf(self.model_path)
        if self.n_batch * info.n_embd * 4 > MAX_PAYLOAD:  # a micro-batch's hidden states must fit one frame
            raise HomeringError(f"--batch {self.n_batch} is too large for this model: at most "
                                f"{MAX_PAYLOAD // (info.n_embd * 4)} tokens of {info.n_embd} floats fit a frame")
        self.info = info
        self.fingerprint = info.fingerprint
        self.tokenizer = await asyncio.to_thread(Tokenizer, self.model_path)
        await asyncio.to_thread(getattr, self.tokenizer, "max_token_bytes")  # read the vocabulary once, off the loop
        api = await self._start_api() if self.api else None
        connection = asyncio.create_task(self._connection())
        try:
            done, _ = await asyncio.wait([connection, asyncio.create_task(self._connected.wait())],
                                         return_when=asyncio.FIRST_COMPLETED)
            if connection in done:
                connection.result()  # raises the connect error
            if self.ha_discovery:
                await publish_discovery(self._client, controller_configs())
            self._spawn(self._publish_stats())
            self._spawn(self._watch_loop())
            await self._bring_up(info)
            maintain = asyncio.create_task(self._maintain(info))
            try:
                done, _ = await asyncio.wait([connection, maintain], return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
            finally:
                maintain.cancel()
        finally:
            client = self._client
            # a clean exit sends no last-will: say so ourselves, or the retained "ready" would linger
            if client is not None and self.state != "error":  # keep an error's detail for clients
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    await asyncio.wait_for(client.publish(Topics.CONTROLLER, self._status_message("offline").dump(self.key),
                                                          qos=1, retain=True), 2.0)
            connection.cancel()
            with contextlib.suppress(asyncio.CancelledError, HomeringError):
                await connection
            if api is not None:
                api.should_exit = True
                await self._api_task

    async def _connection(self) -> None:
        """Keep a broker connection: subscribe, publish the retained state again, read; reconnect with backoff.

        Raises:
            HomeringError: the first connection failed.
        """
        will = aiomqtt.Will(Topics.CONTROLLER, ControllerStatus(state="offline").dump(self.key), qos=1, retain=True)

        async def session(client: aiomqtt.Client, reconnected: bool) -> None:
            for topic in (Topics.ALL_PROFILES, Topics.ALL_STATUS, Topics.REQUESTS, Topics.PLAN,
                          Topics.ALL_PROBE_RESULTS, Topics.ALL_STREAMS, Topics.ALL_STATS):
                await client.subscribe(topic, qos=1)
            if self.plan is not None:  # a restarted broker lost the retained plan
                await client.publish(Topics.PLAN, self.plan.dump(self.key), qos=1, retain=True)
            await client.publish(Topics.CONTROLLER, self._status_message(self.state, self.detail).dump(self.key),
                                 qos=1, retain=True)
            self._client = client
            self._connected_at = time.monotonic()
            self._connected.set()
            if reconnected:
                for rid in list(self._orders):  # events published while we were away are lost
                    self._spawn(self._replay(rid))
            try:
                await self._read(client)
            finally:
                self._connected.clear()
                self._disconnected_at = time.monotonic()
                self._client = None

        await mqtt.keep_connected(self.broker, session, identifier="homering-controller", will=will, keepalive=5)

    async def _publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                       wait: bool = True) -> bool:
        """Publish, waiting for the broker while it is away (``wait``); False when it was not published."""
        while True:
            if wait:
                await self._connected.wait()
            client = self._client
            if client is None:
                return False
            try:
                await client.publish(topic, payload, qos=qos, retain=retain)
                return True
            except aiomqtt.MqttError as exc:
                if not wait:
                    return False
                log.warning("could not publish to %s (%s); retrying after a reconnect", topic, exc)
                self._connected.clear()
                await asyncio.sleep(0.1)

    async def _start_api(self):
        """Serve the OpenAI-compatible API (uvicorn) on this event loop; returns the server."""
        from homering.api.openai import serve

        host, port = self.api
        server, self._api_task = await serve(self, host, port)
        log.info("OpenAI-compatible API on %s", self.api_url)
        return server

    @property
    def api_url(self) -> str | None:
        if not self.api:
            return None
        host, port = self.api
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        return f"http://{shown}:{port}/v1"

    @property
    def model_id(self) -> str:
        """The model's name in the API: the GGUF file name without ``.gguf``."""
        return self.model_path.name.removesuffix(".gguf")

    def _status_message(self, state: str, detail: str | None = None) -> ControllerStatus:
        return ControllerStatus(
            state=state, model=self.model_path.name, model_path=str(self.model_path),
            model_fingerprint=self.fingerprint, n_ctx=self.n_ctx, plan_id=self.plan.plan_id if self.plan else None,
            detail=detail, api=self.api_url, model_facts=dist.model_facts(self.info) if self.info else None)

    async def _status(self, state: str, detail: str | None = None) -> None:
        """Set and publish (retained) the controller's state; published again after a reconnect."""
        self.state = state
        self.detail = detail
        await self._publish(Topics.CONTROLLER, self._status_message(state, detail).dump(self.key), retain=True)

    def stats(self) -> ControllerStats:
        return ControllerStats(model=self.model_path.name, requests_in_flight=len(self.in_flight),
                               queue_depth=self.sequences.queue_depth, n_parallel=self.n_parallel,
                               tokens_generated=self.metrics.tokens_total)

    async def _publish_stats(self) -> None:
        """Publish :class:`ControllerStats` (retained) every few seconds."""
        while True:
            await self._publish(Topics.CONTROLLER_STATS, self.stats().dump(self.key), qos=0, retain=True, wait=False)
            await asyncio.sleep(STATS_INTERVAL_S)

    def _silent(self, name: str) -> bool:
        """The agent's heartbeat stopped: nothing from it for :data:`LOST_AFTER_S` while we were connected
        and this event loop was free to hear it.

        A loop that was blocked (:meth:`_watch_loop`) had the heartbeats wait unread in the socket: then
        nobody is silent until :data:`LOST_AFTER_S` after the loop came back.
        """
        now = time.monotonic()
        if self._loop_tick is not None and now - self._loop_tick > LOOP_STALL_S:
            return False  # blocked until just now: the reader has not caught up
        since = max(self._last_seen.get(name, 0.0), self._connected_at, self._loop_stalled_at)
        return self._connected.is_set() and now - since > LOST_AFTER_S

    async def _watch_loop(self) -> None:
        """Tick every :data:`LOOP_TICK_S`; a late tick means the event loop was blocked (a slow request, a
        long parse): :meth:`_silent` then gives every agent its full grace again from that moment."""
        self._loop_tick = time.monotonic()
        while True:
            await asyncio.sleep(LOOP_TICK_S)
            now = time.monotonic()
            if now - self._loop_tick > LOOP_TICK_S + LOOP_STALL_S:
                log.warning("the controller's event loop was blocked for %.1f s", now - self._loop_tick - LOOP_TICK_S)
                self._loop_stalled_at = now
            self._loop_tick = now

    def _live(self, name: str) -> bool:
        """The agent's status is live and its heartbeat goes on.

        An ``offline`` status (a last will) counts only once our own broker
        connection outlived it by :data:`OFFLINE_GRACE_S`: a broker that stops
        publishes every client's will, and the agents come back with it (then
        their heartbeat decides). A retained ``offline`` (the agent was gone
        before this controller subscribed) counts at once.
        """
        status = self.statuses.get(name)
        if status is None or self._silent(name):
            return False
        if status.state in LIVE_STATES:
            return True
        if status.state == "offline":
            at = self._offline_at.get(name)
            if at is None:  # retained: it was gone before we came
                return False
            if not self._connected.is_set():  # while we are away from the broker we cannot tell
                return True
            if at <= self._disconnected_at <= at + OFFLINE_GRACE_S:  # a stopping broker's will: the heartbeat decides
                return True
            return time.monotonic() - at < OFFLINE_GRACE_S
        return False

    def live_agents(self) -> list[AgentProfile]:
        """Agents with a profile whose status is not offline/error and whose heartbeat goes on."""
        return [p for n, p in sorted(self.profiles.items()) if self._live(n)]

    def profiled_agents(self) -> list[AgentProfile]:
        """Live agents that have measured their device for this controller's model."""
        return [p for p in self.live_agents()
                if p.device is not None and p.device.model_fingerprint == self.fingerprint]

    @property
    def ready(self) -> bool:
        """A loaded plan is intact and serves requests (False while re-planning or after a loss)."""
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        if value and not self._ready:
            self._ready_gen += 1
            self.draining = False
        self._ready = value
        self._changed.set()  # wake the requests waiting for a plan

    def _admissible(self, gen: int) -> bool:
        """May a request that began waiting at ready-generation ``gen`` start now?

        Requests that waited through a re-plan start on the plan that ended the
        wait even if agents have joined since (:attr:`draining`); requests that
        arrive while draining wait for the join's plan. Without this, a join
        could re-plan again before the waiting requests ran, and they would
        wait through a second re-plan.
        """
        return self._ready and (not self.draining or gen < self._ready_gen)

    def _at_boundary(self) -> bool:
        """No request runs on the current plan and none is due to start on it (a join may re-plan now).

        Requests waiting since before the current plan became ready are due to
        start on it. Requests still waiting for a plan do not count, or a join
        and a resumption would wait for each other.
        """
        return (not any(rid in self._heads for rid in self.in_flight)
                and not any(gen < self._ready_gen for gen in self._waiting.values()))

    @staticmethod
    def _identity(p: AgentProfile) -> tuple:
        return (p.name, p.host, p.data_port, p.pid)  # a restarted agent is a new member

    def _hold_s(self, name: str) -> float:
        """How long a (re)joining agent must stay up before it is planned in: doubles with each recent loss."""
        now = time.monotonic()
        recent = [t for t in self._losses.get(name, []) if now - t < FLAP_WINDOW_S]
        self._losses[name] = recent
        return min(JOIN_HOLD_S * 2 ** len(recent), JOIN_HOLD_MAX_S)

    def members(self) -> frozenset:
        """Identities of the agents a plan would be made for now.

        Agents of the current plan stay members while they live; a new or
        returning agent becomes one after :meth:`_hold_s` seconds up
        (hysteresis: a flapping device does not force re-plans in a loop).
        """
        if self.planned_members is None:  # the first plan: every agent that joined
            return frozenset(self._identity(p) for p in self.profiled_agents())
        now, planned = time.monotonic(), self.planned_members
        out = set()
        for p in self.profiled_agents():
            ident = self._identity(p)
            if ident in planned or now - self._live_since.get(p.name, now) >= self._hold_s(p.name):
                out.add(ident)
        return frozenset(out)

    def lost(self) -> list[str]:
        """Agents of the current plan's ring that are no longer live members."""
        if self.plan is None or self.planned_members is None:
            return []
        current = {m[0] for m in self.members()}
        ring = {a.name for a in self.plan.ring}
        return sorted(m[0] for m in self.planned_members if m[0] in ring and m[0] not in current)

    async def _wait_for(self, predicate, timeout: float | None, *, poll: float | None = None) -> bool:
        """Wait until ``predicate()`` holds (re-checked on every message, and every ``poll`` seconds for
        predicates that depend on time); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else float("inf")
        while not predicate():
            self._changed.clear()
            left = deadline - loop.time()
            if left <= 0:
                return False
            wait = min(left, poll) if poll is not None else left
            try:
                await asyncio.wait_for(self._changed.wait(), None if wait == float("inf") else wait)
            except TimeoutError:
                if loop.time() >= deadline:
                    return predicate()
        return True

    async def _bring_up(self, info) -> None:
        log.info("waiting for %d agent(s) on %s", self.n_agents, self.broker)
        if not await self._wait_for(lambda: len(self.profiled_agents()) >= self.n_agents, self.join_timeout):
            live, done = self.live_agents(), self.profiled_agents()
            errors = [f"{n}: {s.detail}" for n, s in sorted(self.statuses.items()) if s.state == "error" and s.detail]
            msg = (f"only {len(done)} of {self.n_agents} agents joined and profiled within "
                   f"{self.join_timeout:.0f} s ({len(live)} connected)"
                   + (f"; {'; '.join(errors)}" if errors else
                      f": start more with 'homering agent --broker {self.broker}'"))
            await self._status("error", msg)
            raise HomeringError(msg)
        if await self._adopt():
            return
        while True:
            try:
                await self._replan(info)
                return
            except AgentLost as exc:
                log.warning("%s: planning again", exc)
                self.planned_members = None  # the first plan: every agent still there

    async def _adopt(self) -> bool:
        """Take over the retained plan when its agents still serve it (a restarted controller).

        The plan must be for this model with these settings, and every agent
        of its ring must be live and ``ready`` with it; then no agent reloads
        anything.
        """
        serving = {s.plan_id for n, s in self.statuses.items() if s.state == "ready" and s.plan_id}
        if not serving:
            return False
        await self._wait_for(lambda: self._retained_plan is not None and self._retained_plan.plan_id in serving, 2.0)
        plan = self._retained_plan
        if plan is None or plan.plan_id not in serving:
            return False
        live = {p.name: p for p in self.profiled_agents()}
        same = (plan.model_fingerprint == self.fingerprint and plan.model_path == str(self.model_path)
                and plan.n_ctx == self.n_ctx and plan.n_batch == self.n_batch and plan.n_parallel == self.n_parallel
                and plan.planner == self.planner and (self.rounds is None or plan.k == self.rounds))
        members_ok = all(
            a.name in live and (live[a.name].host, live[a.name].data_port) == (a.host, a.data_port)
            and self.statuses[a.name].state == "ready" and self.statuses[a.name].plan_id == plan.plan_id
            for a in plan.ring)
        if not (same and members_ok):
            return False
        hashed = plan.model_copy(deep=True)
        await self._prepare_windows(hashed)
        if hashed != plan:  # hashes missing (an older controller's plan) or different: the agents reload
            return False
        self.plan = plan
        self.planned_members = frozenset(self._identity(p) for p in live.values())
        self.links = {a.name: (a.link_ms, 0.0) for a in plan.ring if a.link_ms is not None}
        self.ready = True
        await self._status("ready")
        log.info("adopted plan %s: its %d agent(s) still serve it (head %s)", plan.plan_id, len(plan.ring),
                 plan.head.name)
        return True

    async def _replan(self, info) -> None:
        """Probe links, plan over the profiled agents, publish the plan, and wait until it is loaded.

        Raises:
            HomeringError: no agents, no feasible plan, or the agents could not load it.
        """
        self.ready = False
        await self._status("planning")
        members = self.members()
        agents = await self._probe_links([p for p in self.profiled_agents() if self._identity(p) in members])
        if not agents:
            raise HomeringError("no agents left to plan for")
        shape = shape_from_gguf(self.model_path, self.n_ctx, self.n_parallel, self.n_batch)
        try:
            self.plan = make_plan(agents, shape, model_path=str(self.model_path), model_fingerprint=info.fingerprint,
                                  n_ctx=self.n_ctx, n_batch=self.n_batch, n_parallel=self.n_parallel,
                                  planner=self.planner, ks=[self.rounds] if self.rounds else None)
            self.links = {a.name: (a.device.link_ms, a.device.link_mbps) for a in agents if a.device}
        except PlanError as exc:
            await self._status("error", str(exc))
            raise
        await self._prepare_windows(self.plan)
        probed = {p.name for p in agents}
        for name in {m[0] for m in members} - probed:  # the link probe failed: it rejoins after a hold
            self._losses.setdefault(name, []).append(time.monotonic())
            self._live_since[name] = time.monotonic()
        self.planned_members = frozenset(m for m in members if m[0] in probed)
        # names the new plan: agents load only the plan the controller vouches for
        await self._status("planning", self._loading_detail())
        log.info("plan %s (%s, k=%d, predicted %.1f ms/token): %s%s", self.plan.plan_id, self.plan.planner,
                 self.plan.k, self.plan.predicted_ms_per_token or 0,
                 ", ".join(f"{a.name}{[(w.start, w.end) for w in a.windows]}" for a in self.plan.ring),
                 f"; dropped {', '.join(self.plan.dropped)}" if self.plan.dropped else "")
        await self._publish(Topics.PLAN, self.plan.dump(self.key), retain=True)

        def loaded() -> bool:
            lost = self.lost()
            if lost:
                raise AgentLost(f"lost agent(s) {', '.join(lost)} while the plan loaded")
            sts = [self.statuses.get(a.name) for a in self.plan.ring]
            failed = [s for s in sts if s and s.state == "error" and s.plan_id == self.plan.plan_id]
            if failed:
                raise HomeringError(f"an agent could not load its windows: {failed[0].detail}")
            return all(s and s.state == "ready" and s.plan_id == self.plan.plan_id for s in sts)

        deadline = time.monotonic() + self.join_timeout * 5
        while not loaded():
            if self.detail != (shown := self._loading_detail()):  # the status names whom the plan waits for
                await self._status("planning", shown)
            if not await self._wait_for(lambda: loaded() or self._loading_detail() != shown,
                                        deadline - time.monotonic(), poll=0.5):
                raise HomeringError(f"the agents did not load their windows within {self.join_timeout * 5:.0f} s "
                                    f"({shown})")
        self.ready = True
        await self._status("ready")
        log.info("cluster ready: %d agent(s), head %s", len(self.plan.ring), self.plan.head.name)

    def _loading_detail(self) -> str:
        """The status detail while the plan loads: the agents of its ring not ``ready`` with it yet."""
        plan = self.plan
        left = [a.name for a in plan.ring if not ((st := self.statuses.get(a.name)) is not None
                                                  and st.state == "ready" and st.plan_id == plan.plan_id)]
        return f"waiting for {', '.join(left)} to load plan {plan.plan_id}" if left else f"plan {plan.plan_id} loaded"

    async def _prepare_windows(self, plan: Plan) -> None:
        """Slice (or find in the window cache) every window of ``plan``, write each file's SHA-256 and size
        into the plan, and serve those files from now on (instead of the previous plan's).

        Raises:
            HomeringError: a window cannot be sliced (ModelError) or read.
        """
        def prepare() -> dict[str, Path]:
            files = {}
            for agent in plan.ring:
                for w in agent.windows:
                    spec = WindowSpec(w.start, w.end, Role.for_range(w.start, w.end, plan.n_layers))
                    path = slice_window(self.model_path, spec, progress=False, model_fp=plan.model_fingerprint)
                    w.sha256, w.size = dist.file_sha256(path), path.stat().st_size
                    files[w.sha256] = path
            dist.prune_cache(set(files.values()) | set(self._probe_files.values()),
                             spare_bytes=sum(p.stat().st_size for p in files.values()))
            return files

        t0 = time.perf_counter()
        try:
            self._plan_files = await asyncio.to_thread(prepare)
        except OSError as exc:
            raise HomeringError(f"cannot read a window file: {exc}") from None
        log.info("windows of plan %s sliced and hashed in %.2f s (%d files, %.1f MB)", plan.plan_id,
                 time.perf_counter() - t0, len(self._plan_files),
                 sum(p.stat().st_size for p in self._plan_files.values()) / 1e6)

    def window_file(self, sha256: str) -> Path | None:
        """The file with this hash when it may be served (a window of the current plan or a probe window)."""
        return self._plan_files.get(sha256) or self._probe_files.get(sha256)

    async def probe_window(self, label: str) -> WindowFile | None:
        """Slice a probe window (``<start>-<end>-<role>``, see :func:`~homering.profiler.compute.possible_probe_specs`)
        for an agent without the model, and serve it from now on; None for any other window."""
        from homering.profiler.compute import possible_probe_specs

        try:
            start, end, role = label.split("-")
            spec = WindowSpec(int(start), int(end), Role(role))
        except ValueError:
            return None
        if self.info is None or spec not in possible_probe_specs(self.info):
            return None

        def prepare() -> tuple[Path, str]:
            path = slice_window(self.model_path, spec, progress=False, model_fp=self.fingerprint)
            return path, dist.file_sha256(path)

        async with self._probe_lock:  # agents profiling at once ask for the same windows
            path, digest = await asyncio.to_thread(prepare)
        self._probe_files[digest] = path
        return WindowFile(start=spec.start, end=spec.end, role=spec.role.value, sha256=digest,
                          size=path.stat().st_size)

    async def _probe_links(self, agents: list[AgentProfile]) -> list[AgentProfile]:
        """Each agent measures its data-plane link to the head, one at a time (so they do not share bandwidth).

        Returns the agents with ``device.link_*`` filled in; an agent whose probe
        fails is left out (it could not reach the head).

        Raises:
            AgentLost: the head-to-be was lost meanwhile.
        """
        if len(agents) < 2:
            return agents
        head = head_of(agents)
        out = []
        for p in agents:
            if p.name == head.name:
                out.append(p)
                continue
            probe_id = uuid.uuid4().hex[:12]
            await self._status("planning", f"waiting for {p.name} to measure its link to {head.name}")
            await self._publish(Topics.probe(p.name), LinkProbe(
                probe_id=probe_id, host=head.host, port=head.data_port).dump(self.key))
            answered = await self._wait_for(
                lambda: probe_id in self._reports or not self._live(p.name) or not self._live(head.name),
                PROBE_TIMEOUT_S, poll=0.5)
            if not self._live(head.name):
                raise AgentLost(f"lost agent {head.name} (the head-to-be) while probing links")
            if not answered or probe_id not in self._reports:
                log.warning("agent %s did not answer the link probe; left out of the plan", p.name)
                continue
            report = self._reports.pop(probe_id)
            if report.error:
                log.warning("agent %s cannot reach the head: %s; left out of the plan", p.name, report.error)
                continue
            log.info("link %s -> %s: %.3f ms, %.0f Mbit/s", p.name, head.name, report.link_ms, report.link_mbps)
            device = p.device.model_copy(update={"link_ms": report.link_ms, "link_mbps": report.link_mbps})
            out.append(p.model_copy(update={"device": device}))
        return out

    async def _maintain(self, info) -> None:
        """Re-plan when the agents change: at once when one of the ring is lost (the requests in flight
        resume on the new ring), at the next request boundary when agents join."""
        def due() -> bool:
            if self.plan is None:
                return False
            if self._broken or self.lost():
                self.ready = False
                return True
            if self.members() == self.planned_members:
                self.draining = False
                return False
            self.draining = True  # new requests wait for the new plan
            return self._at_boundary()

        while True:
            await self._wait_for(due, None, poll=0.5)
            lost, why = self.lost(), self._broken
            if lost:
                log.warning("lost agent(s) %s: re-planning over the rest", ", ".join(lost))
                for name in lost:
                    self._losses.setdefault(name, []).append(time.monotonic())
            elif why:
                log.warning("a head reported a broken ring (%s): re-planning", why)
            else:
                await asyncio.sleep(SETTLE_S)  # let a burst of joins settle
                if not due():
                    continue
                log.info("agents changed: re-planning")
            self._broken = None
            await self._interrupt_all()
            if not self.profiled_agents():
                self.ready = False
                self.planned_members = frozenset()
                self._plan_failed = (time.monotonic(), "every agent left")
                log.warning("every agent left; waiting for one to join")
                await self._status("waiting", "no agents")
                await self._wait_for(lambda: bool(self.members()), None, poll=0.5)
                continue
            try:
                await self._replan(info)
                self._plan_failed = None
            except AgentLost as exc:
                if self._still_served():  # e.g. a joining agent left while links were probed
                    log.warning("%s; the plan in force still runs", exc)
                    self.ready = True
                    await self._status("ready")
                else:
                    log.warning("%s: planning again", exc)  # lost() now names it: the loop comes straight back
            except HomeringError as exc:  # e.g. the model no longer fits the agents left
                log.error("re-planning failed: %s", exc)
                self._plan_failed = (time.monotonic(), str(exc))
                self.planned_members = self.members()  # wait for the agents to change again
                await self._status("waiting", f"re-planning failed: {exc}")

    def _still_served(self) -> bool:
        """The plan in force lost none of its agents, and every agent of its ring is ``ready`` with it."""
        plan = self.plan
        return plan is not None and not self.lost() and all(
            (st := self.statuses.get(a.name)) is not None and st.state == "ready" and st.plan_id == plan.plan_id
            for a in plan.ring)

    async def _interrupt_all(self) -> None:
        """Tell the heads of the requests in flight to end them with ``interrupted`` (they resume later)."""
        for rid in list(self.in_flight):
            head = self._heads.get(rid)
            if head is None:
                continue  # already waiting to resume
            if self._live(head):
                await self._publish(Topics.cancel(head), CancelJob(request_id=rid, interrupt=True).dump(self.key), wait=False)
            elif rid in self._streams:  # the head itself is gone: the request resumes from the tokens we saw
                self._streams[rid].put_nowait(StreamEvent(
                    request_id=rid, type="interrupted", attempt=self._orders[rid].attempt,
                    error=f"its head {head} was lost"))
            else:
                self._free(rid)

    def _seen(self, name: str) -> None:
        """A message from agent ``name``: its heartbeat goes on."""
        now = time.monotonic()
        if name not in self._last_seen or self._silent(name):
            self._live_since[name] = now
        self._last_seen[name] = now

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            try:
                if message.topic.matches(Topics.ALL_PROFILES):
                    if message.payload:
                        p = self._state_order.check(topic, AgentProfile.load(message.payload, key=self.key))
                        self.profiles[p.name] = p
                        self._seen(p.name)
                elif message.topic.matches(Topics.ALL_STATUS):
                    name = topic.split("/")[-2]
                    if message.payload:
                        status = self._state_order.check(topic, AgentStatus.load(message.payload, key=self.key))
                        before = self.statuses.get(name)
                        self.statuses[name] = status
                        if status.state == "offline":
                            if message.retain:
                                self._offline_at.pop(name, None)
                            else:
                                self._offline_at[name] = time.monotonic()
                            log.warning("agent %s went offline", name)
                        else:
                            if before is None or before.state not in LIVE_STATES:
                                self._live_since[name] = time.monotonic()
                            self._seen(name)
                elif message.topic.matches(Topics.REQUESTS):
                    self._spawn(self._on_request(GenerateRequest.load(message.payload, key=self.key)))
                elif message.topic.matches(Topics.ALL_STATS):
                    if message.payload:
                        st = self._state_order.check(topic, AgentStats.load(message.payload, key=self.key))
                        self.agent_stats[st.name] = st
                        if not message.retain:  # a retained copy is no heartbeat
                            self._seen(st.name)
                elif message.topic.matches(Topics.PLAN):
                    if message.payload:
                        self._retained_plan = Plan.load(message.payload, key=self.key)
                elif message.topic.matches(Topics.ALL_PROBE_RESULTS):
                    report = LinkReport.load(message.payload, key=self.key)
                    self._reports[report.probe_id] = report
                elif message.topic.matches(Topics.ALL_STREAMS):
                    event = StreamEvent.load(message.payload, key=self.key)
                    if event.request_id != topic.rsplit("/", 1)[-1]:
                        raise MalformedMessage(f"a StreamEvent of {event.request_id} on another request's topic")
                    self._on_stream(event.request_id, event)
            except MalformedMessage as exc:
                log.warning("dropped malformed message on %s: %s", topic, exc)
            self._changed.set()

    def _on_stream(self, request_id: str, event: StreamEvent) -> None:
        """A stream event from a head: in order, once, to the request's consumer (see :class:`StreamOrder`)."""
        events, order = self._streams.get(request_id), self._orders.get(request_id)
        if events is not None and order is not None:
            for ev in order.push(event):
                events.put_nowait(ev)
            if order.waiting:  # some were lost (a broker outage): ask the head again
                self._spawn(self._replay(request_id))
        elif request_id in self._abandoned and event.type in ("done", "error", "interrupted"):
            self.metrics.count("cancelled")
            self._free(request_id)

    async def _replay(self, request_id: str) -> None:
        """Ask the request's head to publish its events again from the first one we miss."""
        order, head = self._orders.get(request_id), self._heads.get(request_id)
        if order is None or head is None:
            return
        await self._publish(Topics.replay(head), StreamReplay(
            request_id=request_id, attempt=order.attempt, from_index=order.expected).dump(self.key), wait=False)

    async def _on_request(self, req: GenerateRequest) -> None:
        """A request over MQTT: admit it; the head streams the answer to the client's topic itself."""
        try:
            async for _ in self.submit(req):
                pass
        except RequestError as exc:
            log.info("request %s rejected: %s", req.request_id, exc)
            await self._publish(Topics.stream(req.request_id), StreamEvent(
                request_id=req.request_id, type="error", error=str(exc)).dump(self.key))
        except Exception as exc:  # a bug: the client still gets an answer (submit() freed the sequence)
            log.exception("request %s failed", req.request_id)
            await self._publish(Topics.stream(req.request_id), StreamEvent(
                request_id=req.request_id, type="error", error=f"internal error: {exc!r}"[:500]).dump(self.key))

    def prepare(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids: the chat rendered with the model's template, the text tokenized, or the ids.

        Raises:
            RequestError: 400 for a malformed request, 413 when the prompt does not fit the context.
        """
        if sum(x is not None for x in (req.messages, req.prompt, req.prompt_token_ids)) != 1:
            raise RequestError(400, "a request needs exactly one of 'messages', 'prompt' or 'prompt_token_ids'")
        # Before tokenizing (its cost grows faster than linearly with the special tokens in a text): a
        # lower bound of the tokens, as every message renders to one at least and no token stands for more
        # than max_token_bytes bytes of text. Token ids are counted as they are, below.
        tokenizer = self.tokenizer
        texts = [m.content for m in req.messages] if req.messages is not None else [req.prompt or ""]
        least = max(len(req.messages or ()), sum(map(len, texts)) // tokenizer.max_token_bytes)
        if least >= self.n_ctx:
            raise RequestError(413, f"the prompt ({len(texts)} message(s), {sum(map(len, texts))} characters) "
                                    f"cannot fit the context of {self.n_ctx} tokens", code="context_length_exceeded")
        try:
            if req.messages is not None:
                ids = tokenizer.chat_tokens([m.model_dump() for m in req.messages])
            elif req.prompt is not None:
                ids = tokenizer.tokenize(req.prompt, add_special=True, parse_special=True)
            else:
                ids = req.prompt_token_ids
                bad = [t for t in ids if not 0 <= t < tokenizer.n_vocab]
                if bad:
                    raise RequestError(400, f"prompt_token_ids has {len(bad)} id(s) outside the vocabulary "
                                            f"[0, {tokenizer.n_vocab}), e.g. {bad[0]}")
        except RequestError:
            raise
        except HomeringError as exc:
            raise RequestError(400, str(exc)) from None
        except UnicodeError:
            raise RequestError(400, "the request's text is not valid Unicode (a lone surrogate?)") from None
        if not ids:
            raise RequestError(400, "the prompt is empty")
        if len(ids) >= self.n_ctx:
            raise RequestError(413, f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}: "
                                    f"shorten it or restart with a larger --ctx", code="context_length_exceeded")
        return ids

    async def submit(self, req: GenerateRequest) -> AsyncIterator[StreamEvent]:
        """Admit a request and yield its stream events up to and including ``done`` or ``error``.

        The request gets one of the ``n_parallel`` KV sequences (waiting in
        the FIFO queue when all are busy) and goes to the head. When the
        consumer stops early (a client that disconnected), the head is told
        to cancel; the sequence is free again once the head has stopped.

        When the ring breaks mid-answer (``interrupted``, or the head lost),
        the request resumes on the next plan from the tokens already yielded:
        the consumer sees a pause, never a repeated or changed token. If no
        plan can be made any more, it ends with an ``error`` event.

        Raises:
            RequestError: 400/413 (see :meth:`prepare`), 429 when the queue is
                full, 503 when no plan is ready.
        """
        # templating and tokenizing run off the event loop, which hears the agents' heartbeats
        async with self._tokenizing:
            ids = await asyncio.to_thread(self.prepare, req)
        if self.plan is None or self.state in ("waiting", "error"):
            raise RequestError(503, "no plan is ready yet: the agents are still joining or loading"
                               if self.state != "error" else f"the cluster failed: {self.detail}")
        t0 = time.perf_counter()
        try:
            seq = await self.sequences.acquire()
        except QueueFull as exc:
            self.metrics.count("queue_full")
            raise RequestError(429, str(exc), code="queue_full") from None
        rid = req.request_id
        events: asyncio.Queue = asyncio.Queue()
        order = StreamOrder()
        finished = False
        sent: list[int] = []  # token ids yielded so far
        try:
            gen = self._ready_gen
            if not self._admissible(gen):
                self._waiting[rid] = gen
                waited = time.monotonic()
                try:
                    if not await self._wait_for(lambda: self._admissible(gen), self.join_timeout * 5):
                        raise RequestError(503, "the cluster is re-planning and not ready yet; try again")
                finally:
                    del self._waiting[rid]
                log.info("request %s waited %.1f s for plan %s", rid, time.monotonic() - waited, self.plan.plan_id)
            self.in_flight[rid] = seq
            self._streams[rid] = events
            self._orders[rid] = order
            plan_id = await self._start(rid, seq, ids, req, sent, 0)
            while True:
                event = await events.get()
                if event.type == "interrupted":  # the ring broke: resume on the next plan
                    if event.attempt != order.attempt:
                        continue  # about an attempt already given up
                    why = event.error or "interrupted"
                    if self.ready and self.plan is not None and self.plan.plan_id == plan_id:
                        self._broken = why  # nobody re-plans otherwise (e.g. a ring that stalled)
                    log.info("request %s interrupted after %d token(s) (%s); resuming", rid, len(sent), why)
                    order.advance(order.attempt + 1)
                    plan_id = await self._resume(rid, seq, ids, req, sent, order.attempt, plan_id)
                    if plan_id is not None:
                        continue
                    event = StreamEvent(request_id=rid, type="error", error=(
                        f"the cluster lost an agent and could not resume the request: "
                        f"{self._plan_failed[1] if self._plan_failed else 'no plan'}"))
                if event.type == "token" and event.token_id is not None:
                    sent.append(event.token_id)
                if event.type in ("done", "error"):
                    finished = True
                    self.metrics.finished(event, time.perf_counter() - t0)
                    if event.type == "done" and event.ms_per_token and len(event.token_ids or []) > 1:
                        self.measured_ms_per_token = event.ms_per_token
                yield event
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            self._orders.pop(rid, None)
            head = self._heads.get(rid)
            if rid not in self.in_flight:
                self.sequences.release(seq)  # never reached the head
            elif finished or head is None:
                self._free(rid)
            else:  # the consumer left: stop the head; the sequence frees when its "done" arrives
                self._abandoned.add(rid)
                self._spawn(self._cancel(head, rid))

    async def _start(self, rid: str, seq: int, ids: list[int], req: GenerateRequest, sent: list[int],
                     attempt: int) -> str:
        """Send the job (or, for ``attempt`` > 0, its resumption after ``sent``) to the current plan's head."""
        plan = self.plan
        job = GenerateJob(request_id=rid, plan_id=plan.plan_id, seq_id=seq, prompt_token_ids=ids,
                          sampling=req.sampling, attempt=attempt, resume_token_ids=list(sent))
        payload = job.dump(self.key)  # may raise: then no head has it, and submit() frees the sequence
        self._heads[rid] = plan.head.name
        await self._publish(Topics.generate(plan.head.name), payload)
        return plan.plan_id

    async def _resume(self, rid: str, seq: int, ids: list[int], req: GenerateRequest, sent: list[int],
                      attempt: int, old_plan: str) -> str | None:
        """Wait for a plan other than ``old_plan`` and resume the request on it; None when re-planning failed."""
        t = time.monotonic()
        self._heads.pop(rid, None)
        self._changed.set()
        gen = self._ready_gen
        if self.ready and self.plan is not None and self.plan.plan_id != old_plan:
            gen -= 1  # the new plan is ready already: resume on it

        def settled() -> bool:  # a new plan, or the last re-plan failed (and none succeeded since)
            return self._plan_failed is not None or (
                self._admissible(gen) and self.plan is not None and self.plan.plan_id != old_plan)

        self._waiting[rid] = gen
        try:
            if not await self._wait_for(settled, self.join_timeout * 5, poll=0.5) or not self.ready:
                return None
        finally:
            del self._waiting[rid]
        log.info("request %s resumes on plan %s after %.1f s", rid, self.plan.plan_id, time.monotonic() - t)
        return await self._start(rid, seq, ids, req, sent, attempt)

    async def _cancel(self, head: str, request_id: str) -> None:
        await self._publish(Topics.cancel(head), CancelJob(request_id=request_id).dump(self.key), wait=False)
        log.info("request %s cancelled (its client left)", request_id)

    def _free(self, request_id: str) -> None:
        """The request is over: its sequence goes to the next in line."""
        seq = self.in_flight.pop(request_id, None)
        self._abandoned.discard(request_id)
        self._heads.pop(request_id, None)
        if seq is not None:
            self.sequences.release(seq)
        self._changed.set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

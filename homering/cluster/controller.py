"""``homering controller``: tracks agents, plans, and turns user requests into head jobs.

The controller keeps no state that the broker does not also hold: agents'
profiles and statuses are retained messages, and so is the plan it publishes.
It announces the model (agents measure their device for it), probes every
agent's link to the head, plans with the measured profiles, and re-plans when
agents join or leave, between requests, never during one. It tokenizes
requests (rendering chats with the model's template), rejects prompts that do
not fit the context, and hands the token ids to the head, which streams the
answer straight to the client's topic.
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
from homering.cluster import mqtt
from homering.cluster.homeassistant import controller_configs, publish_discovery
from homering.cluster.scheduler import QueueFull, Sequences
from homering.cluster.schema import (
    MAX_PAYLOAD, AgentProfile, AgentStats, AgentStatus, CancelJob, ControllerStats, ControllerStatus, GenerateJob,
    GenerateRequest, LinkProbe, LinkReport, MalformedMessage, Plan, StreamEvent, Topics,
)
from homering.cluster.security import ClusterKey
from homering.engine.tokenizer import Tokenizer
from homering.errors import HomeringError
from homering.models.gguf_info import inspect_gguf
from homering.planner import head_of, make_plan
from homering.planner.model import PlanError, shape_from_gguf

DEFAULT_BATCH = 64  # tokens per prefill micro-batch (see Controller)
DEFAULT_PARALLEL = 4  # requests served at once (KV sequences per window)
DEFAULT_QUEUE = 16  # requests that may wait for a sequence
STATS_INTERVAL_S = 2.0

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
        ha_discovery: announce the controller to Home Assistant (MQTT discovery).
        key: the cluster key (:mod:`homering.cluster.security`): plans, jobs, probes and the status go out
            signed, and requests must be signed [default: an open cluster].
    """

    def __init__(self, broker: mqtt.BrokerURL, model_path: Path, *, n_agents: int, n_ctx: int = 2048,
                 join_timeout: float = 60.0, planner: str = "halda", rounds: int | None = None,
                 n_batch: int = DEFAULT_BATCH, n_parallel: int = DEFAULT_PARALLEL,
                 max_queue: int = DEFAULT_QUEUE, api: tuple[str, int] | None = None, ha_discovery: bool = False,
                 key: ClusterKey | None = None):
        self.broker = broker
        self.key = key
        self.n_parallel = n_parallel
        self.sequences = Sequences(n_parallel, max_queue)
        self.api = api
        self.ha_discovery = ha_discovery
        self.metrics = Metrics(self)
        self.tokenizer: Tokenizer | None = None
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
        self.ready = False
        self.state = "waiting"
        self.fingerprint: str | None = None
        self.planned_members: frozenset | None = None
        self.in_flight: dict[str, int] = {}  # request id -> its KV sequence
        self._reports: dict[str, LinkReport] = {}
        self._changed = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Plan once the agents are in, then serve requests until cancelled.

        Raises:
            HomeringError: the broker is unreachable, the agents did not join
                or could not load their windows in time.
        """
        info = inspect_gguf(self.model_path)
        if self.n_batch * info.n_embd * 4 > MAX_PAYLOAD:  # a micro-batch's hidden states must fit one frame
            raise HomeringError(f"--batch {self.n_batch} is too large for this model: at most "
                                f"{MAX_PAYLOAD // (info.n_embd * 4)} tokens of {info.n_embd} floats fit a frame")
        self.fingerprint = info.fingerprint
        self.tokenizer = await asyncio.to_thread(Tokenizer, self.model_path)
        api = await self._start_api() if self.api else None
        will = aiomqtt.Will(Topics.CONTROLLER, ControllerStatus(state="offline").dump(self.key), qos=1, retain=True)
        try:
            async with mqtt.client(self.broker, identifier="homering-controller", will=will) as client:
                self._client = client
                await self._status("waiting")
                for topic in (Topics.ALL_PROFILES, Topics.ALL_STATUS, Topics.REQUESTS,
                              Topics.ALL_PROBE_RESULTS, Topics.ALL_STREAMS, Topics.ALL_STATS):
                    await client.subscribe(topic, qos=1)
                if self.ha_discovery:
                    await publish_discovery(client, controller_configs())
                self._spawn(self._publish_stats())
                reader = asyncio.create_task(self._read(client))
                try:
                    await self._bring_up(info)
                    maintain = asyncio.create_task(self._maintain(info))
                    try:
                        done, _ = await asyncio.wait([reader, maintain], return_when=asyncio.FIRST_COMPLETED)
                        for task in done:
                            task.result()
                    finally:
                        maintain.cancel()
                finally:
                    reader.cancel()
                    # a clean exit sends no last-will: say so ourselves, or the retained "ready" would linger
                    if self.state != "error":  # keep an error's detail for clients
                        with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                            await asyncio.wait_for(self._status("offline"), 2.0)
        except aiomqtt.MqttError as exc:
            raise mqtt.connect_error(self.broker, exc) from None
        finally:
            if api is not None:
                api.should_exit = True
                await self._api_task

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

    async def _status(self, state: str, detail: str | None = None) -> None:
        self.state = state
        self.detail = detail
        await self._client.publish(Topics.CONTROLLER, ControllerStatus(
            state=state, model=self.model_path.name, model_path=str(self.model_path),
            model_fingerprint=self.fingerprint, n_ctx=self.n_ctx, plan_id=self.plan.plan_id if self.plan else None,
            detail=detail, api=self.api_url).dump(self.key), qos=1, retain=True)

    def stats(self) -> ControllerStats:
        return ControllerStats(model=self.model_path.name, requests_in_flight=len(self.in_flight),
                               queue_depth=self.sequences.queue_depth, n_parallel=self.n_parallel,
                               tokens_generated=self.metrics.tokens_total)

    async def _publish_stats(self) -> None:
        """Publish :class:`ControllerStats` (retained) every few seconds."""
        while True:
            try:
                await self._client.publish(Topics.CONTROLLER_STATS, self.stats().dump(), qos=0, retain=True)
            except aiomqtt.MqttError:
                return
            await asyncio.sleep(STATS_INTERVAL_S)

    def live_agents(self) -> list[AgentProfile]:
        """Agents with a profile whose status is not offline/error."""
        return [p for n, p in sorted(self.profiles.items())
                if self.statuses.get(n) is not None and self.statuses[n].state in LIVE_STATES]

    def profiled_agents(self) -> list[AgentProfile]:
        """Live agents that have measured their device for this controller's model."""
        return [p for p in self.live_agents()
                if p.device is not None and p.device.model_fingerprint == self.fingerprint]

    def members(self) -> frozenset:
        """Identity of the agents a plan would be made for (a restarted agent is a new member)."""
        return frozenset((p.name, p.host, p.data_port, p.pid) for p in self.profiled_agents())

    async def _wait_for(self, predicate, timeout: float | None) -> bool:
        """Wait until ``predicate()`` holds (re-checked on every message); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else float("inf")
        while not predicate():
            self._changed.clear()
            if timeout is None:
                await self._changed.wait()
                continue
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
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
        await self._replan(info)

    async def _replan(self, info) -> None:
        """Probe links, plan over the profiled agents, publish the plan, and wait until it is loaded.

        Raises:
            HomeringError: no agents, no feasible plan, or the agents could not load it.
        """
        self.ready = False
        await self._status("planning")
        members = self.members()
        agents = await self._probe_links(self.profiled_agents())
        if not agents:
            raise HomeringError("no agents left to plan for")
        shape = shape_from_gguf(self.model_path, self.n_ctx, self.n_parallel)
        try:
            self.plan = make_plan(agents, shape, model_path=str(self.model_path), model_fingerprint=info.fingerprint,
                                  n_ctx=self.n_ctx, n_batch=self.n_batch, n_parallel=self.n_parallel,
                                  planner=self.planner, ks=[self.rounds] if self.rounds else None)
            self.links = {a.name: (a.device.link_ms, a.device.link_mbps) for a in agents if a.device}
        except PlanError as exc:
            await self._status("error", str(exc))
            raise
        self.planned_members = members
        await self._status("planning")  # names the new plan: agents load only the plan the controller vouches for
        log.info("plan %s (%s, k=%d, predicted %.1f ms/token): %s%s", self.plan.plan_id, self.plan.planner,
                 self.plan.k, self.plan.predicted_ms_per_token or 0,
                 ", ".join(f"{a.name}{[(w.start, w.end) for w in a.windows]}" for a in self.plan.ring),
                 f"; dropped {', '.join(self.plan.dropped)}" if self.plan.dropped else "")
        await self._client.publish(Topics.PLAN, self.plan.dump(self.key), qos=1, retain=True)

        def loaded() -> bool:
            sts = [self.statuses.get(a.name) for a in self.plan.ring]
            failed = [s for s in sts if s and s.state == "error" and s.plan_id == self.plan.plan_id]
            if failed:
                raise HomeringError(f"an agent could not load its windows: {failed[0].detail}")
            return all(s and s.state == "ready" and s.plan_id == self.plan.plan_id for s in sts)

        if not await self._wait_for(loaded, self.join_timeout * 5):
            raise HomeringError("the agents did not load their windows in time")
        self.ready = True
        await self._status("ready")
        log.info("cluster ready: %d agent(s), head %s", len(self.plan.ring), self.plan.head.name)

    async def _probe_links(self, agents: list[AgentProfile]) -> list[AgentProfile]:
        """Each agent measures its data-plane link to the head, one at a time (so they do not share bandwidth).

        Returns the agents with ``device.link_*`` filled in; an agent whose probe
        fails is left out (it could not reach the head).
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
            await self._client.publish(Topics.probe(p.name), LinkProbe(
                probe_id=probe_id, host=head.host, port=head.data_port).dump(self.key), qos=1)
            if not await self._wait_for(lambda: probe_id in self._reports, PROBE_TIMEOUT_S):
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
        """Re-plan when agents join or leave, once no request is in flight."""
        def due() -> bool:
            if self.members() == self.planned_members:
                return False
            self.ready = False  # new requests wait for the new plan
            head = self.statuses.get(self.plan.head.name) if self.plan else None
            if head is None or head.state not in LIVE_STATES:  # the head is gone, and every request it served
                for rid in list(self.in_flight):
                    events = self._streams.get(rid)
                    if events is not None:
                        events.put_nowait(None)
                    else:
                        self._free(rid)
            return not self.in_flight

        while True:
            await self._wait_for(due, None)
            await asyncio.sleep(SETTLE_S)
            if not due():
                continue
            if not self.profiled_agents():
                if self.ready:
                    log.warning("every agent left; waiting for one to join")
                    self.ready = False
                    await self._status("waiting", "no agents")
                await self._wait_for(lambda: bool(self.profiled_agents()), None)
                continue
            log.info("agents changed: re-planning")
            await self._replan(info)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic = message.topic.value
            try:
                if message.topic.matches(Topics.ALL_PROFILES):
                    if message.payload:
                        p = AgentProfile.load(message.payload)
                        self.profiles[p.name] = p
                elif message.topic.matches(Topics.ALL_STATUS):
                    name = topic.split("/")[-2]
                    if message.payload:
                        self.statuses[name] = AgentStatus.load(message.payload)
                        if self.statuses[name].state == "offline":
                            log.warning("agent %s went offline", name)
                elif message.topic.matches(Topics.REQUESTS):
                    self._spawn(self._on_request(GenerateRequest.load(message.payload, key=self.key)))
                elif message.topic.matches(Topics.ALL_STATS):
                    if message.payload:
                        st = AgentStats.load(message.payload)
                        self.agent_stats[st.name] = st
                elif message.topic.matches(Topics.ALL_PROBE_RESULTS):
                    report = LinkReport.load(message.payload)
                    self._reports[report.probe_id] = report
                elif message.topic.matches(Topics.ALL_STREAMS):
                    request_id = topic.rsplit("/", 1)[-1]
                    events = self._streams.get(request_id)
                    if events is not None:
                        events.put_nowait(StreamEvent.load(message.payload))
                    elif request_id in self._abandoned and StreamEvent.load(message.payload).type in ("done", "error"):
                        self.metrics.count("cancelled")
                        self._free(request_id)
            except MalformedMessage as exc:
                log.warning("dropped malformed message on %s: %s", topic, exc)
            self._changed.set()

    async def _on_request(self, req: GenerateRequest) -> None:
        """A request over MQTT: admit it; the head streams the answer to the client's topic itself."""
        try:
            async for _ in self.submit(req):
                pass
        except RequestError as exc:
            log.info("request %s rejected: %s", req.request_id, exc)
            await self._client.publish(Topics.stream(req.request_id), StreamEvent(
                request_id=req.request_id, type="error", error=str(exc)).dump(), qos=1)

    def prepare(self, req: GenerateRequest) -> list[int]:
        """The prompt's token ids: the chat rendered with the model's template, the text tokenized, or the ids.

        Raises:
            RequestError: 400 for a malformed request, 413 when the prompt does not fit the context.
        """
        if sum(x is not None for x in (req.messages, req.prompt, req.prompt_token_ids)) != 1:
            raise RequestError(400, "a request needs exactly one of 'messages', 'prompt' or 'prompt_token_ids'")
        tokenizer = self.tokenizer
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

        Raises:
            RequestError: 400/413 (see :meth:`prepare`), 429 when the queue is
                full, 503 when no plan is ready.
        """
        ids = self.prepare(req)
        if self.plan is None or self.state in ("waiting", "error"):
            raise RequestError(503, "no plan is ready yet: the agents are still joining or loading"
                               if self.state != "error" else f"the cluster failed: {self.detail}")
        t0 = time.perf_counter()
        try:
            seq = await self.sequences.acquire()
        except QueueFull as exc:
            self.metrics.count("queue_full")
            raise RequestError(429, str(exc), code="queue_full") from None
        events: asyncio.Queue = asyncio.Queue()
        finished = False
        head = None
        try:
            if not self.ready and not await self._wait_for(lambda: self.ready, self.join_timeout * 5):
                raise RequestError(503, "the cluster is re-planning and not ready yet; try again")
            head = self.plan.head.name
            self.in_flight[req.request_id] = seq
            self._streams[req.request_id] = events
            job = GenerateJob(request_id=req.request_id, plan_id=self.plan.plan_id, seq_id=seq,
                              prompt_token_ids=ids, sampling=req.sampling)
            await self._client.publish(Topics.generate(head), job.dump(self.key), qos=1)
            while True:
                event = await events.get()
                if event is None:  # the head went away
                    event = StreamEvent(request_id=req.request_id, type="error",
                                        error="the head agent went offline during the request")
                if event.type in ("done", "error"):
                    finished = True
                    self.metrics.finished(event, time.perf_counter() - t0)
                    if event.type == "done" and event.ms_per_token and len(event.token_ids or []) > 1:
                        self.measured_ms_per_token = event.ms_per_token
                yield event
                if finished:
                    return
        finally:
            self._streams.pop(req.request_id, None)
            if req.request_id not in self.in_flight:
                self.sequences.release(seq)  # never reached the head
            elif finished:
                self._free(req.request_id)
            else:  # the consumer left: stop the head; the sequence frees when its "done" arrives
                self._abandoned.add(req.request_id)
                self._spawn(self._cancel(head, req.request_id))

    async def _cancel(self, head: str, request_id: str) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.publish(Topics.cancel(head), CancelJob(request_id=request_id).dump(self.key), qos=1)
        log.info("request %s cancelled (its client left)", request_id)

    def _free(self, request_id: str) -> None:
        """The request is over: its sequence goes to the next in line."""
        seq = self.in_flight.pop(request_id, None)
        self._abandoned.discard(request_id)
        if seq is not None:
            self.sequences.release(seq)
        self._changed.set()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
import uuid
from pathlib import Path

import aiomqtt

from homering.cluster import mqtt
from homering.cluster.schema import (
    AgentProfile, AgentStatus, ControllerStatus, GenerateJob, GenerateRequest, LinkProbe, LinkReport,
    MalformedMessage, Plan, StreamEvent, Topics,
)
from homering.engine.tokenizer import Tokenizer
from homering.errors import HomeringError
from homering.models.gguf_info import inspect_gguf
from homering.planner import head_of, make_plan
from homering.planner.model import PlanError, shape_from_gguf

DEFAULT_BATCH = 64  # tokens per prefill micro-batch (see Controller)

log = logging.getLogger("homering.controller")

LIVE_STATES = {"online", "loading", "ready"}
PROBE_TIMEOUT_S = 15.0
SETTLE_S = 0.5  # wait for a burst of joins/leaves to settle before re-planning


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
    """

    def __init__(self, broker: mqtt.BrokerURL, model_path: Path, *, n_agents: int, n_ctx: int = 2048,
                 join_timeout: float = 60.0, planner: str = "halda", rounds: int | None = None,
                 n_batch: int = DEFAULT_BATCH):
        self.broker = broker
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
        self.in_flight: set[str] = set()
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
        self.fingerprint = info.fingerprint
        tokenizer = await asyncio.to_thread(Tokenizer, self.model_path)
        will = aiomqtt.Will(Topics.CONTROLLER, ControllerStatus(state="offline").dump(), qos=1, retain=True)
        try:
            async with mqtt.client(self.broker, identifier="homering-controller", will=will) as client:
                self._client = client
                await self._status("waiting")
                for topic in (Topics.ALL_PROFILES, Topics.ALL_STATUS, Topics.REQUESTS,
                              Topics.ALL_PROBE_RESULTS, Topics.ALL_STREAMS):
                    await client.subscribe(topic, qos=1)
                reader = asyncio.create_task(self._read(client, tokenizer))
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

    async def _status(self, state: str, detail: str | None = None) -> None:
        self.state = state
        await self._client.publish(Topics.CONTROLLER, ControllerStatus(
            state=state, model=self.model_path.name, model_path=str(self.model_path),
            model_fingerprint=self.fingerprint, n_ctx=self.n_ctx, plan_id=self.plan.plan_id if self.plan else None, detail=detail).dump(), qos=1, retain=True)

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
        shape = shape_from_gguf(self.model_path, self.n_ctx)
        try:
            self.plan = make_plan(agents, shape, model_path=str(self.model_path), model_fingerprint=info.fingerprint,
                                  n_ctx=self.n_ctx, n_batch=self.n_batch, planner=self.planner,
                                  ks=[self.rounds] if self.rounds else None)
        except PlanError as exc:
            await self._status("error", str(exc))
            raise
        self.planned_members = members
        await self._status("planning")  # names the new plan: agents load only the plan the controller vouches for
        log.info("plan %s (%s, k=%d, predicted %.1f ms/token): %s%s", self.plan.plan_id, self.plan.planner,
                 self.plan.k, self.plan.predicted_ms_per_token or 0,
                 ", ".join(f"{a.name}{[(w.start, w.end) for w in a.windows]}" for a in self.plan.ring),
                 f"; dropped {', '.join(self.plan.dropped)}" if self.plan.dropped else "")
        await self._client.publish(Topics.PLAN, self.plan.dump(), qos=1, retain=True)

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
                probe_id=probe_id, host=head.host, port=head.data_port).dump(), qos=1)
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
            head = self.statuses.get(self.plan.head.name) if self.plan else None
            if head is None or head.state not in LIVE_STATES:
                self.in_flight.clear()  # the head is gone, and with it every request it served
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

    async def _read(self, client: aiomqtt.Client, tokenizer: Tokenizer) -> None:
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
                    self._spawn(self._on_request(GenerateRequest.load(message.payload), tokenizer))
                elif message.topic.matches(Topics.ALL_PROBE_RESULTS):
                    report = LinkReport.load(message.payload)
                    self._reports[report.probe_id] = report
                elif message.topic.matches(Topics.ALL_STREAMS):
                    request_id = topic.rsplit("/", 1)[-1]
                    if request_id in self.in_flight:
                        if StreamEvent.load(message.payload).type in ("done", "error"):
                            self.in_flight.discard(request_id)
            except MalformedMessage as exc:
                log.warning("dropped malformed message on %s: %s", topic, exc)
            self._changed.set()

    async def _on_request(self, req: GenerateRequest, tokenizer: Tokenizer) -> None:
        stream = Topics.stream(req.request_id)

        async def fail(msg: str) -> None:
            log.info("request %s rejected: %s", req.request_id, msg)
            await self._client.publish(stream, StreamEvent(request_id=req.request_id, type="error",
                                                           error=msg).dump(), qos=1)

        if self.plan is None:
            return await fail("no plan is ready yet: the agents are still joining or loading")
        if not self.ready and not await self._wait_for(lambda: self.ready, self.join_timeout * 5):
            return await fail("the cluster is re-planning and not ready yet; try again")
        if sum(x is not None for x in (req.messages, req.prompt, req.prompt_token_ids)) != 1:
            return await fail("a request needs exactly one of 'messages', 'prompt' or 'prompt_token_ids'")
        try:
            if req.messages is not None:
                ids = tokenizer.chat_tokens([m.model_dump() for m in req.messages])
            elif req.prompt is not None:
                ids = tokenizer.tokenize(req.prompt, add_special=True, parse_special=True)
            else:
                ids = req.prompt_token_ids
                bad = [t for t in ids if not 0 <= t < tokenizer.n_vocab]
                if bad:
                    return await fail(f"prompt_token_ids has {len(bad)} id(s) outside the vocabulary "
                                      f"[0, {tokenizer.n_vocab}), e.g. {bad[0]}")
        except HomeringError as exc:
            return await fail(str(exc))
        if not ids:
            return await fail("the prompt is empty")
        if len(ids) >= self.n_ctx:
            return await fail(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}: "
                              f"shorten it or restart with a larger --ctx")
        job = GenerateJob(request_id=req.request_id, plan_id=self.plan.plan_id, prompt_token_ids=ids,
                          sampling=req.sampling)
        self.in_flight.add(req.request_id)
        await self._client.publish(Topics.generate(self.plan.head.name), job.dump(), qos=1)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

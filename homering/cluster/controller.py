"""``homering controller``: tracks agents, plans, and turns user requests into head jobs.

The controller keeps no state that the broker does not also hold: agents'
profiles and statuses are retained messages, and so is the plan it publishes.
It tokenizes requests (rendering chats with the model's template), rejects
prompts that do not fit the context, and hands the token ids to the head,
which streams the answer straight to the client's topic.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiomqtt

from homering.cluster import mqtt
from homering.cluster.schema import (
    AgentProfile, AgentStatus, ControllerStatus, GenerateJob, GenerateRequest, MalformedMessage, Plan,
    StreamEvent, Topics,
)
from homering.engine.tokenizer import Tokenizer
from homering.errors import HomeringError
from homering.models.gguf_info import inspect_gguf
from homering.planner import make_plan

log = logging.getLogger("homering.controller")

LIVE_STATES = {"online", "loading", "ready"}


class Controller:
    """The cluster's coordinator.

    Args:
        broker: the MQTT broker.
        model_path: the GGUF model every agent slices its windows from.
        n_agents: agents to wait for before planning.
        n_ctx: context size (tokens) of every window's KV cache.
        join_timeout: seconds to wait for the agents, and again for them to load.
        planner: a name from :data:`homering.planner.PLANNERS`.
    """

    def __init__(self, broker: mqtt.BrokerURL, model_path: Path, *, n_agents: int, n_ctx: int = 2048,
                 join_timeout: float = 60.0, planner: str = "proportional"):
        self.broker = broker
        self.model_path = Path(model_path)
        self.n_agents = n_agents
        self.n_ctx = n_ctx
        self.join_timeout = join_timeout
        self.planner = planner
        self.profiles: dict[str, AgentProfile] = {}
        self.statuses: dict[str, AgentStatus] = {}
        self.plan: Plan | None = None
        self.ready = False
        self._changed = asyncio.Event()
        self._client: aiomqtt.Client | None = None

    async def run(self) -> None:
        """Plan once the agents are in, then serve requests until cancelled.

        Raises:
            HomeringError: the broker is unreachable, the agents did not join
                or could not load their windows in time.
        """
        info = inspect_gguf(self.model_path)
        tokenizer = await asyncio.to_thread(Tokenizer, self.model_path)
        will = aiomqtt.Will(Topics.CONTROLLER, ControllerStatus(state="offline").dump(), qos=1, retain=True)
        try:
            async with mqtt.client(self.broker, identifier="homering-controller", will=will) as client:
                self._client = client
                await self._status("waiting")
                for topic in (Topics.ALL_PROFILES, Topics.ALL_STATUS, Topics.REQUESTS):
                    await client.subscribe(topic, qos=1)
                reader = asyncio.create_task(self._read(client, tokenizer))
                try:
                    await self._bring_up(info)
                    await reader
                finally:
                    reader.cancel()
        except aiomqtt.MqttError as exc:
            raise mqtt.connect_error(self.broker, exc) from None

    async def _status(self, state: str, detail: str | None = None) -> None:
        await self._client.publish(Topics.CONTROLLER, ControllerStatus(
            state=state, model=self.model_path.name, n_ctx=self.n_ctx,
            plan_id=self.plan.plan_id if self.plan else None, detail=detail).dump(), qos=1, retain=True)

    def live_agents(self) -> list[AgentProfile]:
        """Agents with a profile whose status is not offline/error."""
        return [p for n, p in sorted(self.profiles.items())
                if self.statuses.get(n) is not None and self.statuses[n].state in LIVE_STATES]

    async def _wait_for(self, predicate, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            self._changed.clear()
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
        if not await self._wait_for(lambda: len(self.live_agents()) >= self.n_agents, self.join_timeout):
            msg = (f"only {len(self.live_agents())} of {self.n_agents} agents joined within "
                   f"{self.join_timeout:.0f} s: start more with 'homering agent --broker {self.broker}'")
            await self._status("error", msg)
            raise HomeringError(msg)
        await self._status("planning")
        agents = self.live_agents()[: max(self.n_agents, 1)]
        self.plan = make_plan(agents, n_layers=info.n_layers, model_path=str(self.model_path),
                              model_fingerprint=info.fingerprint, n_ctx=self.n_ctx, planner=self.planner)
        log.info("plan %s: %s", self.plan.plan_id,
                 ", ".join(f"{a.name}[{a.windows[0].start},{a.windows[0].end})" for a in self.plan.ring))
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
                    await self._on_request(GenerateRequest.load(message.payload), tokenizer)
            except MalformedMessage as exc:
                log.warning("dropped malformed message on %s: %s", topic, exc)
            self._changed.set()

    async def _on_request(self, req: GenerateRequest, tokenizer: Tokenizer) -> None:
        stream = Topics.stream(req.request_id)

        async def fail(msg: str) -> None:
            log.info("request %s rejected: %s", req.request_id, msg)
            await self._client.publish(stream, StreamEvent(request_id=req.request_id, type="error",
                                                           error=msg).dump(), qos=1)

        if not self.ready or self.plan is None:
            return await fail("no plan is ready yet: the agents are still joining or loading")
        if (req.messages is None) == (req.prompt is None):
            return await fail("a request needs exactly one of 'messages' or 'prompt'")
        try:
            if req.messages is not None:
                ids = tokenizer.chat_tokens([m.model_dump() for m in req.messages])
            else:
                ids = tokenizer.tokenize(req.prompt, add_special=True, parse_special=True)
        except HomeringError as exc:
            return await fail(str(exc))
        if not ids:
            return await fail("the prompt is empty")
        if len(ids) >= self.n_ctx:
            return await fail(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}: "
                              f"shorten it or restart with a larger --ctx")
        job = GenerateJob(request_id=req.request_id, plan_id=self.plan.plan_id, prompt_token_ids=ids,
                          sampling=req.sampling)
        await self._client.publish(Topics.generate(self.plan.head.name), job.dump(), qos=1)

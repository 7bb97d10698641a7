"""A client of the cluster over MQTT: what ``homering chat`` and ``homering up`` use."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiomqtt

from homering.transport import mqtt
from homering.wire import (
    AgentStats, AgentStatus, BadSignature, CancelJob, ControllerStatus, GenerateRequest, MalformedMessage, MissingKey,
    Plan, StreamEvent, Topics,
)
from homering.transport.streams import StreamOrder
from homering.wire.security import KEY_GRACE_S, ClusterKey, NewestState
from homering.errors import HomeringError


class ClusterClient:
    """Sends :class:`GenerateRequest` s and yields the :class:`StreamEvent` s of the answer.

    Use as ``async with ClusterClient(broker) as c: await c.wait_ready(); async for ev in c.generate(req)``.
    With a cluster ``key`` requests go out signed and the controller's status and plan must be signed.
    """

    def __init__(self, broker: mqtt.BrokerURL, *, key: ClusterKey | None = None):
        self.broker = broker
        self.key = key
        self.refused: str | None = None  # why the last badly signed status/plan was dropped
        self._state_order = NewestState()  # replay check of the agents' signed status and stats
        self.missing_key: str | None = None  # a signed status/plan arrived and this client has no key …
        self._missing_key_at = 0.0  # … first at this loop time
        self.status: ControllerStatus | None = None
        self.plan: Plan | None = None
        self.agent_stats: dict[str, AgentStats] = {}
        self.agent_status: dict[str, AgentStatus] = {}
        self._client = mqtt.client(broker, identifier=f"homering-client-{uuid.uuid4().hex[:8]}")
        self._streams: dict[str, asyncio.Queue] = {}
        self._orders: dict[str, StreamOrder] = {}
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None
        self.lost: str | None = None  # why the broker connection broke (nothing arrives any more)

    async def __aenter__(self) -> "ClusterClient":
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise mqtt.connect_error(self.broker, exc) from None
        await self._client.subscribe(Topics.CONTROLLER, qos=1)
        await self._client.subscribe(Topics.PLAN, qos=1)
        await self._client.subscribe(Topics.ALL_STATS, qos=0)
        await self._client.subscribe(Topics.ALL_STATUS, qos=1)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        if self._reader:
            self._reader.cancel()
        try:
            await self._client.__aexit__(*exc)
        except aiomqtt.MqttError:
            pass

    async def _read(self) -> None:
        """Read messages until the connection breaks; then say so (:attr:`lost`) to every waiter."""
        try:
            await self._read_messages()
        except aiomqtt.MqttError as exc:
            self.lost = f"lost the connection to the MQTT broker {self.broker}: {exc}"
        else:
            self.lost = f"the MQTT broker {self.broker} closed the connection"
        self._changed.set()
        for queue in self._streams.values():
            queue.put_nowait(None)  # wakes generate(), which raises

    async def _read_messages(self) -> None:
        async for message in self._client.messages:
            try:
                if message.topic.matches(Topics.CONTROLLER) and message.payload:
                    self.status = ControllerStatus.load(message.payload, key=self.key)
                elif message.topic.matches(Topics.PLAN) and message.payload:
                    self.plan = Plan.load(message.payload, key=self.key)
                elif message.topic.matches(Topics.ALL_STATS):
                    if message.payload:
                        st = self._state_order.check(message.topic.value,
                                                     AgentStats.load(message.payload, key=self.key))
                        self.agent_stats[st.name] = st
                elif message.topic.matches(Topics.ALL_STATUS):
                    if message.payload:
                        name = message.topic.value.split("/")[-2]
                        self.agent_status[name] = self._state_order.check(
                            message.topic.value, AgentStatus.load(message.payload, key=self.key))
                else:
                    event = StreamEvent.load(message.payload, key=self.key)
                    queue = self._streams.get(event.request_id)
                    order = self._orders.get(event.request_id)
                    if queue is not None and order is not None:
                        for ev in order.push(event):
                            queue.put_nowait(ev)
            except MissingKey as exc:
                if self.missing_key is None:
                    self._missing_key_at = asyncio.get_running_loop().time()
                self.missing_key = self.refused = str(exc)
                continue
            except BadSignature as exc:
                self.refused = str(exc)
                continue
            except MalformedMessage:
                continue
            self._changed.set()

    def progress(self) -> str:
        """What the cluster is doing on its way to ``ready``, in a few words (for a status line).

        E.g. ``"waiting for the controller"``, ``"2 agent(s) online (they measure their device first)"``,
        ``"planning"``, ``"loading windows: 1/3 agent(s) ready"``; the controller's ``detail`` is added.
        """
        st = self.status
        if st is None or st.state == "offline":
            return "waiting for the controller"
        online = [s for s in self.agent_status.values() if s.state != "offline"]
        detail = f" ({st.detail})" if st.detail else ""
        if st.state == "waiting":
            return f"waiting for agents: {len(online)} online{detail}"
        if st.state == "planning":
            if self.plan is not None and self.plan.plan_id == st.plan_id:
                ready = sum(1 for s in online if s.state == "ready" and s.plan_id == st.plan_id)
                return f"loading windows: {ready}/{len(self.plan.ring)} agent(s) ready{detail}"
            return f"planning over {len(online)} agent(s){detail}"
        return f"{st.state}{detail}"

    async def wait_ready(self, timeout: float = 120.0, until=None, on_change=None) -> ControllerStatus:
        """Wait until the controller says ``ready`` (and ``until(plan)`` holds, when given).

        ``on_change()`` is called whenever a status, plan or stats message arrives
        (and at least once a second), e.g. to show :meth:`progress`.

        Raises:
            HomeringError: timeout (the message has the controller's last state and detail), the
                controller reported an error, or the broker connection broke.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if on_change is not None:
                on_change()
            st = self.status
            if (st is not None and st.state == "ready" and self.plan is not None and self.plan.plan_id == st.plan_id
                    and (until is None or until(self.plan))):
                return st
            if st is not None and st.state == "error":
                raise HomeringError(f"the controller failed: {st.detail}")
            if self.lost:  # the status is stale and stays so: waiting on would only time out
                raise HomeringError(f"{self.lost} (the controller's last status: "
                                    f"{st.state if st else 'none'}{f', {st.detail}' if st and st.detail else ''})")
            # a signed status may be a stale retained one of an earlier keyed cluster: a live keyless
            # controller replaces it within moments; a keyed cluster never sends one we can read
            if self.missing_key and st is None and loop.time() - self._missing_key_at > KEY_GRACE_S:
                raise HomeringError(f"the cluster on {self.broker} has a cluster key and this client has none "
                                    f"({self.missing_key}): give it the same key with --key-file FILE or "
                                    f"HOMERING_CLUSTER_KEY")
            left = deadline - loop.time()
            if left <= 0:
                state = (st.state + (f": {st.detail}" if st.detail else "")) if st else "no controller"
                hint = f"; dropped a {self.refused}: is the cluster key the same?" if self.refused else ""
                raise HomeringError(f"the cluster was not ready within {timeout:.0f} s ({state}) "
                                    f"on {self.broker}{hint}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
            except TimeoutError:
                pass

    async def generate(self, request: GenerateRequest, *, timeout: float = 300.0) -> AsyncIterator[StreamEvent]:
        """Publish ``request`` and yield its events up to and including ``done`` or ``error``.

        Raises:
            HomeringError: no event for ``timeout`` seconds, or the broker connection broke.
        """
        if self.lost:
            raise HomeringError(self.lost)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = queue
        self._orders[request.request_id] = StreamOrder()
        topic = Topics.stream(request.request_id)
        await self._client.subscribe(topic, qos=1)
        try:
            await self._client.publish(Topics.REQUESTS, request.dump(self.key), qos=1)
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout)
                except TimeoutError:
                    raise HomeringError(f"no answer from the cluster for {timeout:.0f} s") from None
                if event is None:
                    raise HomeringError(self.lost or "the broker connection broke")
                if event.type == "interrupted":
                    continue  # the ring lost an agent: the controller resumes the request on a new one
                yield event
                if event.type in ("done", "error"):
                    return
        finally:
            self._streams.pop(request.request_id, None)
            self._orders.pop(request.request_id, None)
            try:
                await self._client.unsubscribe(topic)
            except aiomqtt.MqttError:
                pass

    async def cancel(self, request_id: str) -> bool:
        """Ask the head of the current plan to stop ``request_id`` (as the controller does when an API
        client goes away): the head ends the stream with ``done`` (``finish_reason`` ``"cancelled"``), and
        the controller frees the request's sequence when it sees that event.

        A request still queued at the controller has not reached the head, which ignores the cancel:
        send it again until the stream ends. Returns False when there is no plan or no connection.
        The cancel is signed with the cluster key, like requests; a broker whose ACL lets this client
        publish requests only (docker/mosquitto/acl's ``chat`` user) drops it.
        """
        plan = self.plan
        if plan is None or self.lost:
            return False
        try:
            await self._client.publish(Topics.cancel(plan.head.name), CancelJob(request_id=request_id).dump(self.key),
                                       qos=1)
        except aiomqtt.MqttError:
            return False
        return True


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]

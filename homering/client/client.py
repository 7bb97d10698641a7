"""A client of the cluster over MQTT: what ``homering chat``, ``homering up`` and the benchmarks use.

One :class:`~homering.transport.bus.Bus` carries everything: the controller's status and plan, the agents'
status and stats (retained), the requests out and their streams in. The bus reconnects after a broker loss;
the client says so at once (:attr:`ClusterClient.lost`: waiters and streams raise) and serves again once the
connection is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, Callable

from homering.errors import HomeringError
from homering.transport import mqtt
from homering.transport.bus import Bus, Received
from homering.transport.streams import StreamOrder
from homering.wire import (
    AgentState,
    AgentStats,
    AgentStatus,
    BadSignature,
    CancelJob,
    Codec,
    ControllerState,
    ControllerStatus,
    EventType,
    GenerateRequest,
    MalformedMessage,
    MissingKey,
    Plan,
    StreamEvent,
    Topics,
)
from homering.wire.security import KEY_GRACE_S, ClusterKey


class ClusterClient:
    """Sends :class:`GenerateRequest` s and yields the :class:`StreamEvent` s of the answer.

    Use as ``async with ClusterClient(broker) as c: await c.wait_ready(); async for ev in c.generate(req)``.
    With a cluster ``key`` requests go out signed and the controller's status and plan must be signed.

    Attributes (read them; the client updates them as messages arrive):
        status: the controller's last :class:`ControllerStatus` (None before the first).
        plan: the current :class:`Plan` (None before the first).
        agent_status, agent_stats: each agent's last :class:`AgentStatus` and :class:`AgentStats`, by name.
        lost: why the broker connection is down (None while connected); the client reconnects meanwhile.
        refused: why the last badly signed message was dropped (None before the first).
        missing_key: a signed message arrived and this client has no key (None before).
        identifier: the client's MQTT client id.
    """

    def __init__(self, broker: mqtt.BrokerURL, *, key: ClusterKey | None = None):
        self.broker = broker
        self.key = key
        self.identifier = f"homering-client-{uuid.uuid4().hex[:8]}"
        self.refused: str | None = None
        self.missing_key: str | None = None
        self._missing_key_at = 0.0  # loop time of the first missing-key message
        self.status: ControllerStatus | None = None
        self.plan: Plan | None = None
        self.agent_stats: dict[str, AgentStats] = {}
        self.agent_status: dict[str, AgentStatus] = {}
        self.lost: str | None = None
        self._streams: dict[str, asyncio.Queue[StreamEvent | None]] = {}
        self._orders: dict[str, StreamOrder] = {}
        self._changed = asyncio.Event()
        self.bus = Bus(
            broker, Codec(key), identifier=self.identifier, on_refused=self._refused, on_message=self._changed.set
        )
        self.bus.route(Topics.CONTROLLER, ControllerStatus, self._on_status, qos=1)
        self.bus.route(Topics.PLAN, Plan, self._on_plan, qos=1)
        self.bus.route(Topics.ALL_STATS, AgentStats, self._on_stats, qos=0, newest=True)
        self.bus.route(Topics.ALL_STATUS, AgentStatus, self._on_agent_status, qos=1, newest=True)
        self.bus.on_connect(self._connected)
        self.bus.on_disconnect(self._disconnected)
        self._run: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ connection
    async def __aenter__(self) -> ClusterClient:
        """Connect (and keep reconnecting after losses until the block ends).

        Raises:
            HomeringError: the broker cannot be reached, or refused the login (one line).
        """
        self._run = asyncio.create_task(self.bus.run(), name=f"{self.identifier} bus")
        up = asyncio.create_task(self.bus.connected.wait())
        try:
            await asyncio.wait({self._run, up}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while connecting: no __aexit__ follows
            self._run.cancel()
            raise
        finally:
            up.cancel()
        if self._run.done():
            self._run.result()  # the first connection failed: its HomeringError
            raise HomeringError(f"the connection to the MQTT broker {self.broker} ended at once")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._run is not None:
            self._run.cancel()
            await asyncio.wait({self._run})  # the connection closes (a cancel of this task still propagates)
            if not self._run.cancelled():
                self._run.exception()  # retrieved: closing, a failure of the connection no longer matters

    async def _connected(self, reconnected: bool) -> None:
        self.lost = None
        self._changed.set()

    def _disconnected(self) -> None:
        """Say at once that the connection is down: waiters wake, streams raise; the bus reconnects."""
        self.lost = f"lost the connection to the MQTT broker {self.broker} (reconnecting)"
        self._changed.set()
        for queue in self._streams.values():
            queue.put_nowait(None)  # wakes generate(), which raises

    # ------------------------------------------------------------------ what arrives
    def _refused(self, _topic: str, exc: MalformedMessage) -> None:
        if isinstance(exc, MissingKey):
            if self.missing_key is None:
                self._missing_key_at = asyncio.get_running_loop().time()
            self.missing_key = self.refused = str(exc)
        elif isinstance(exc, BadSignature):
            self.refused = str(exc)

    def _on_status(self, r: Received) -> None:
        self.status = r.message

    def _on_plan(self, r: Received) -> None:
        self.plan = r.message

    def _on_stats(self, r: Received) -> None:
        self.agent_stats[r.message.name] = r.message

    def _on_agent_status(self, r: Received) -> None:
        if r.ref is not None and r.ref.name is not None:
            self.agent_status[r.ref.name] = r.message

    def _on_event(self, r: Received) -> None:
        event: StreamEvent = r.message
        queue = self._streams.get(event.request_id)
        order = self._orders.get(event.request_id)
        if queue is not None and order is not None:
            for ev in order.push(event):
                queue.put_nowait(ev)

    # ------------------------------------------------------------------ waiting for the cluster
    def progress(self) -> str:
        """What the cluster is doing on its way to ``ready``, in a few words (for a status line).

        E.g. ``"waiting for the controller"``, ``"2 agent(s) online (they measure their device first)"``,
        ``"planning"``, ``"loading windows: 1/3 agent(s) ready"``; the controller's ``detail`` is added.
        """
        st = self.status
        if st is None or st.state == ControllerState.OFFLINE:
            return "waiting for the controller"
        online = [s for s in self.agent_status.values() if s.state != AgentState.OFFLINE]
        detail = f" ({st.detail})" if st.detail else ""
        if st.state == ControllerState.WAITING:
            return f"waiting for agents: {len(online)} online{detail}"
        if st.state == ControllerState.PLANNING:
            if self.plan is not None and self.plan.plan_id == st.plan_id:
                ready = sum(1 for s in online if s.ready_on(st.plan_id))
                return f"loading windows: {ready}/{len(self.plan.ring)} agent(s) ready{detail}"
            return f"planning over {len(online)} agent(s){detail}"
        return f"{st.state}{detail}"

    def _not_ready(self, timeout: float, started: float) -> HomeringError | None:
        """Why :meth:`wait_ready` must give up now (an error, a lost connection, a missing key, its timeout)."""
        st = self.status
        now = asyncio.get_running_loop().time()
        if self.lost:  # the status is stale until the connection is back: neither ready nor waiting is known
            return HomeringError(
                f"{self.lost} (the controller's last status: "
                f"{st.state if st else 'none'}{f', {st.detail}' if st and st.detail else ''})"
            )
        if st is not None and st.state == ControllerState.ERROR:
            return HomeringError(f"the controller failed: {st.detail}")
        # a signed status may be a stale retained one of an earlier keyed cluster: a live keyless
        # controller replaces it within moments; a keyed cluster never sends one we can read
        if self.missing_key and st is None and now - self._missing_key_at > KEY_GRACE_S:
            return HomeringError(
                f"the cluster on {self.broker} has a cluster key and this client has none "
                f"({self.missing_key}): give it the same key with --key-file FILE or "
                f"HOMERING_CLUSTER_KEY"
            )
        if now - started >= timeout:
            state = (st.state + (f": {st.detail}" if st.detail else "")) if st else "no controller"
            hint = f"; dropped a {self.refused}: is the cluster key the same?" if self.refused else ""
            return HomeringError(f"the cluster was not ready within {timeout:.0f} s ({state}) on {self.broker}{hint}")
        return None

    async def wait_ready(
        self,
        timeout: float = 120.0,
        until: Callable[[Plan], bool] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> ControllerStatus:
        """Wait until the controller says ``ready`` (and ``until(plan)`` holds, when given).

        ``on_change()`` is called whenever a status, plan or stats message arrives
        (and at least once a second), e.g. to show :meth:`progress`.

        Raises:
            HomeringError: timeout (the message has the controller's last state and detail), the
                controller reported an error, the broker connection is down (:attr:`lost`: even a
                ``ready`` status seen before is stale then), or the cluster has a key and this client has none.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            if on_change is not None:
                on_change()
            st, plan = self.status, self.plan
            if (
                not self.lost
                and st is not None
                and st.state == ControllerState.READY
                and plan is not None
                and plan.plan_id == st.plan_id
                and (until is None or until(plan))
            ):
                return st
            if (error := self._not_ready(timeout, started)) is not None:
                raise error
            self._changed.clear()
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(started + timeout - loop.time(), 1.0))

    # ------------------------------------------------------------------ requests
    async def generate(self, request: GenerateRequest, *, timeout: float = 300.0) -> AsyncGenerator[StreamEvent, None]:
        """Publish ``request`` and yield its events up to and including ``done`` or ``error``.

        Raises:
            HomeringError: no event for ``timeout`` seconds, or the broker connection is down or broke.
        """
        if self.lost:
            raise HomeringError(self.lost)
        rid = request.request_id
        queue: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
        self._streams[rid], self._orders[rid] = queue, StreamOrder()
        topic = Topics.stream(rid)
        try:
            await self.bus.subscribe(topic, StreamEvent, self._on_event, qos=1)
            if not await self.bus.publish(Topics.REQUESTS, request, qos=1, wait=False):
                raise HomeringError(self.lost or f"could not send the request to the MQTT broker {self.broker}")
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout)
                except (TimeoutError, asyncio.TimeoutError):
                    raise HomeringError(f"no answer from the cluster for {timeout:.0f} s") from None
                if event is None:
                    raise HomeringError(self.lost or "the broker connection broke")
                if event.type == EventType.INTERRUPTED:
                    continue  # the ring lost an agent: the controller resumes the request on a new one
                yield event
                if event.type in (EventType.DONE, EventType.ERROR):
                    return
        finally:
            self._streams.pop(rid, None)
            self._orders.pop(rid, None)
            await self.bus.unsubscribe(topic)

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
        return await self.bus.publish(
            Topics.cancel(plan.head.name), CancelJob(request_id=request_id), qos=1, wait=False
        )


def new_request_id() -> str:
    """A fresh request id: 16 hex digits."""
    return uuid.uuid4().hex[:16]

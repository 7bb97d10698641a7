"""One MQTT connection of a process, and its one router: the control plane's bus.

The controller, every agent and every client hold one :class:`Bus`. It keeps the
connection (reconnecting with backoff, :func:`~homering.transport.mqtt.keep_connected`),
subscribes the routes it was given (a topic filter, the message class expected there,
the QoS and a handler), decodes every payload with the process's
:class:`~homering.wire.Codec` and hands the handler a :class:`Received`. Messages that
do not decode, are badly signed, replay an agent's older state, or make the handler
raise are logged and dropped: the bus keeps serving.

Agents' retained state (profile, status, stats) goes through a
:class:`~homering.wire.NewestState` check when the route says ``newest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt

from homering.tasks import cancelling
from homering.transport import mqtt
from homering.wire import Codec, MalformedMessage, Message, NewestState, TopicRef, parse

log = logging.getLogger("homering.bus")

LEAVE_TIMEOUT_S = 5.0
"""How long a clean exit may take to say goodbye (retained offline status, cleared discovery)."""


@dataclass(frozen=True)
class Received:
    """One decoded message: its topic (and the topic parsed), the message (None for an empty payload, i.e. a
    cleared retained message, on a route that takes those) and whether the broker delivered a retained copy."""

    topic: str
    ref: TopicRef | None
    message: Any
    retained: bool


@dataclass
class Route:
    """Where messages of one topic filter go: the class they must decode as, QoS, and the handler.

    ``newest``: agents' retained state, checked with :class:`~homering.wire.NewestState`.
    ``empty``: pass empty payloads (cleared retained messages) to the handler as ``message=None``
    instead of ignoring them.
    """

    topic: str
    kind: type[Message]
    handler: Callable[[Received], object]
    qos: int = 1
    newest: bool = False
    empty: bool = False


Hook = Callable[[bool], Awaitable[None]]


class Bus:
    """A process's MQTT connection: routes in, :meth:`publish` out, reconnects while :meth:`run` runs.

    Args:
        broker: where the broker is.
        codec: encodes what is published and decodes what arrives (the cluster key).
        identifier: the MQTT client id (unique per process).
        will: an ``aiomqtt.Will``, or a function that makes one per connection (a signed will carries
            its signing time).
        keepalive: MQTT keepalive, s: the broker publishes the will about 1.5 × this after a silent loss.
        on_refused: called with (topic, error) for every dropped message (e.g. to notice a missing key).
        on_message: called after every message, dropped or not (e.g. to wake waiters).
    """

    def __init__(
        self,
        broker: mqtt.BrokerURL,
        codec: Codec,
        *,
        identifier: str,
        will: aiomqtt.Will | Callable[[], aiomqtt.Will] | None = None,
        keepalive: int = 10,
        on_refused: Callable[[str, MalformedMessage], None] | None = None,
        on_message: Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.codec = codec
        self.identifier = identifier
        self.will = will
        self.keepalive = keepalive
        self.on_refused = on_refused
        self.on_message = on_message
        self.routes: list[Route] = []
        self.connected = asyncio.Event()
        self.client: aiomqtt.Client | None = None
        self._on_connect: list[Hook] = []
        self._on_disconnect: list[Callable[[], None]] = []
        self._on_leave: list[Callable[[], Awaitable[None]]] = []
        self._state = NewestState()

    # ------------------------------------------------------------------ setup
    def route(
        self,
        topic: str,
        kind: type[Message],
        handler: Callable[[Received], object],
        *,
        qos: int = 1,
        newest: bool = False,
        empty: bool = False,
    ) -> None:
        """Deliver messages on ``topic`` (a filter, ``+``/``#`` allowed) to ``handler``; subscribed on every
        connection. The first route whose filter matches a topic takes its messages."""
        self.routes.append(Route(topic, kind, handler, qos, newest, empty))

    def on_connect(self, hook: Hook) -> None:
        """``await hook(reconnected)`` after each connection's subscriptions (publish retained state here)."""
        self._on_connect.append(hook)

    def on_disconnect(self, hook: Callable[[], None]) -> None:
        """``hook()`` when a connection ends (lost or closed)."""
        self._on_disconnect.append(hook)

    def on_leave(self, hook: Callable[[], Awaitable[None]]) -> None:
        """``await hook()`` on a clean exit, while still connected (a clean exit sends no last will)."""
        self._on_leave.append(hook)

    # ------------------------------------------------------------------ running
    async def run(self) -> None:
        """Connect, serve the routes, reconnect after losses; until cancelled.

        Raises:
            HomeringError: the first connection failed.
        """
        await mqtt.keep_connected(
            self.broker, self._session, identifier=self.identifier, will=self.will, keepalive=self.keepalive
        )

    async def _session(self, client: aiomqtt.Client, reconnected: bool) -> None:
        for r in self.routes:
            await client.subscribe(r.topic, qos=r.qos)
        self.client = client
        try:
            self.connected.set()
            for hook in self._on_connect:
                await hook(reconnected)
            async for message in client.messages:
                self.dispatch(message.topic.value, bytes(message.payload or b""), bool(message.retain))
        finally:
            self.connected.clear()
            if cancelling():
                for leave in self._on_leave:
                    with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                        await asyncio.wait_for(leave(), LEAVE_TIMEOUT_S)
            self.client = None
            for gone in self._on_disconnect:
                gone()

    def attach(self, client: Any) -> None:
        """Use ``client`` (anything with ``aiomqtt.Client.publish``) as the connection, without :meth:`run`:
        no subscriptions, no hooks. For feeding :meth:`dispatch` by hand with no broker (the fuzz tests)."""
        self.client = client
        self.connected.set()

    def dispatch(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """Route one message (what :meth:`run` does with each one that arrives)."""
        try:
            parsed = aiomqtt.Topic(topic)  # once per message: stream events come once per token
            route = next((r for r in self.routes if parsed.matches(r.topic)), None)
            if route is None:
                return
            msg = None
            if payload:
                msg = self.codec.decode(route.kind, payload)
                if route.newest:
                    msg = self._state.check(topic, msg)
            elif not route.empty:
                return
            route.handler(Received(topic, parse(topic), msg, retained))
        except MalformedMessage as exc:
            log.warning("dropped malformed message on %s: %s", topic, exc)
            if self.on_refused is not None:
                self.on_refused(topic, exc)
        except Exception:  # a handler's bug must not stop the bus
            log.exception("dropped a message on %s: its handler failed", topic)
        finally:
            if self.on_message is not None:
                self.on_message()

    async def subscribe(
        self, topic: str, kind: type[Message], handler: Callable[[Received], object], *, qos: int = 1
    ) -> None:
        """Add a route now (subscribed at once when connected, and on every later connection)."""
        self.route(topic, kind, handler, qos=qos)
        if self.client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.subscribe(topic, qos=qos)

    async def unsubscribe(self, topic: str) -> None:
        """Remove the routes of ``topic`` (and unsubscribe, when connected)."""
        self.routes = [r for r in self.routes if r.topic != topic]
        if self.client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self.client.unsubscribe(topic)

    async def publish(
        self, topic: str, msg: Message | bytes, *, qos: int = 1, retain: bool = False, wait: bool = True
    ) -> bool:
        """Publish ``msg`` (encoded with the codec; bytes as they are). With ``wait``, wait for the broker
        while it is away and retry after a reconnect; without, give up at once. False when not published."""
        payload = msg if isinstance(msg, bytes) else self.codec.encode(msg)
        while True:
            if wait:
                await self.connected.wait()
            client = self.client
            if client is None:
                return False
            try:
                await client.publish(topic, payload, qos=qos, retain=retain)
                return True
            except aiomqtt.MqttError as exc:
                if not wait:
                    return False
                log.warning("could not publish to %s (%s); retrying after a reconnect", topic, exc)
                self.connected.clear()
                await asyncio.sleep(0.1)

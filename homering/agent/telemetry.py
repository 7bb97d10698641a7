"""What an agent tells about its work: window statistics, the heartbeat, and the head's stream history.

- :class:`WindowMeter` counts the work of one loaded plan's windows (a lock of its own: link threads and
  generation loops add to it while the heartbeat reads it).
- :class:`Heartbeat` publishes :class:`~homering.wire.AgentStats` (retained) every
  :data:`STATS_INTERVAL_S`: the controller counts an agent that falls silent as lost.
- :class:`StreamHistory` keeps the stream events of the head's recent requests, numbered, so that they can
  be published again after a broker outage (on reconnect) or when the controller asks
  (:class:`~homering.wire.StreamReplay`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import psutil

from homering.rate import WorkRate
from homering.tasks import Tasks
from homering.wire import AgentStats, EventType, StreamEvent, StreamReplay, Topics, WindowAssignment, WindowStats

if TYPE_CHECKING:
    from homering.agent.ring import Ring

log = logging.getLogger("homering.agent")

STATS_INTERVAL_S = 1.0
"""Seconds between :class:`AgentStats` publications; they double as the heartbeat the controller watches."""
HISTORY_REQUESTS = 32
"""Requests whose stream events the head keeps for a :class:`StreamReplay`."""

T = TypeVar("T")
Publish = Callable[..., Awaitable[bool]]
"""``await publish(topic, message, qos=…, retain=…)``: True when the broker took it (never waits for a
broker that is away)."""


class WindowMeter:
    """Work done by one plan's windows since the agent loaded it: per window (:class:`WindowStats`, in round
    order), tokens sampled (the head) and the work rate (:class:`~homering.rate.WorkRate`: tokens sampled on
    the head, rows computed elsewhere, ``count_rows``)."""

    def __init__(self, windows: list[WindowAssignment], *, count_rows: bool) -> None:
        self._lock = threading.Lock()
        self._stats = [WindowStats(start=w.start, end=w.end, round=w.round) for w in windows]
        self._count_rows = count_rows
        self.tokens_generated = 0
        self.rate = WorkRate()

    def timed(self, round_: int, n_tokens: int, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` (a window's forward) and add its time to round ``round_``'s statistics."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            ms = (time.perf_counter() - t0) * 1000
            with self._lock:
                st = self._stats[round_]
                st.forwards += 1
                st.tokens += n_tokens
                st.compute_ms += ms
            if self._count_rows:
                self.rate.add(n_tokens)

    def sampled(self) -> None:
        """The head sampled a token."""
        with self._lock:
            self.tokens_generated += 1
        self.rate.add()

    def windows(self) -> list[WindowStats]:
        """A copy of the per-window statistics."""
        with self._lock:
            return [w.model_copy() for w in self._stats]


def agent_stats(name: str, ring: Ring | None) -> AgentStats:
    """This agent's telemetry now (``ring``: the loaded plan, if any).

    ``tokens_per_s`` is the rate of its most recent run of work (tokens sampled on the head, rows computed
    elsewhere; see :class:`~homering.rate.WorkRate`): during an answer its current rate, after it that
    answer's (not 0.0 as soon as an interval passes without work).
    """
    mem = psutil.Process().memory_info()
    anon = max(0, mem.rss - getattr(mem, "shared", 0))
    if ring is None:
        return AgentStats(name=name, rss_bytes=mem.rss, anon_bytes=anon)
    windows = ring.meter.windows()
    return AgentStats(
        name=name,
        plan_id=ring.plan.plan_id,
        layers=sum(w.end - w.start for w in windows),
        windows=windows,
        tokens_generated=ring.meter.tokens_generated,
        tokens_per_s=ring.meter.rate.per_s(),
        rss_bytes=mem.rss,
        anon_bytes=anon,
        requests_active=len(ring.slots),
    )


class Heartbeat:
    """Publishes this agent's :class:`AgentStats` (retained, QoS 0) every ``interval`` seconds; while the
    broker is away nothing is published."""

    def __init__(
        self, name: str, current: Callable[[], Ring | None], publish: Publish, interval: float = STATS_INTERVAL_S
    ) -> None:
        self.name = name
        self._current = current
        self._publish = publish
        self.interval = interval

    def snapshot(self) -> AgentStats:
        """The telemetry now."""
        return agent_stats(self.name, self._current())

    async def run(self) -> None:
        """Publish until cancelled."""
        while True:
            await self._publish(Topics.stats(self.name), self.snapshot(), qos=0, retain=True)
            await asyncio.sleep(self.interval)


class StreamHistory:
    """The stream events of the head's :data:`HISTORY_REQUESTS` most recent requests, and their publishing.

    Token deltas go at QoS 0 (no acknowledgement round trip per token; a live TCP session does not lose
    them), the others at QoS 1, off the decode loop's critical path. While the broker is away events are
    not published; the history has them, and :meth:`republish` (on reconnect) or :meth:`replay` sends them
    again (receivers drop the ones they have, by attempt and index).
    """

    def __init__(self, publish: Publish, tasks: Tasks, keep: int = HISTORY_REQUESTS) -> None:
        self._publish = publish
        self._tasks = tasks
        self._keep = keep
        self._events: dict[str, list[StreamEvent]] = {}

    def open(self, request_id: str) -> list[StreamEvent]:
        """A new attempt of ``request_id``: the list its events are kept in (the oldest request's go)."""
        self._events.pop(request_id, None)
        kept: list[StreamEvent] = []
        self._events[request_id] = kept
        while len(self._events) > self._keep:
            self._events.pop(next(iter(self._events)))
        return kept

    async def publish(self, topic: str, events: asyncio.Queue[StreamEvent | None] | list[StreamEvent]) -> None:
        """Publish ``events`` in order (a queue: until it yields None)."""
        if isinstance(events, list):
            pending: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
            for e in [*events, None]:
                pending.put_nowait(e)
            events = pending
        while (event := await events.get()) is not None:
            qos = 0 if event.type == EventType.TOKEN else 1
            if not await self._publish(topic, event, qos=qos):
                log.debug(
                    "event %s of %s not published (the broker is away): kept for a replay",
                    event.index,
                    event.request_id,
                )

    def replay(self, ask: StreamReplay) -> None:
        """Publish again a request's kept events of ``ask.attempt`` from ``ask.from_index`` on."""
        events = [
            e
            for e in self._events.get(ask.request_id, ())
            if e.attempt == ask.attempt and e.index is not None and e.index >= ask.from_index
        ]
        if events:
            self._tasks.spawn(self.publish(Topics.stream(ask.request_id), events), name="replay")

    def republish(self) -> None:
        """After a reconnect: publish every kept event again."""
        for request_id, events in list(self._events.items()):
            if events:
                self._tasks.spawn(self.publish(Topics.stream(request_id), list(events)), name="republish")

"""One request's stream events, in order and once each, however the broker delivered them."""

from __future__ import annotations

from homering.wire import StreamEvent


class StreamOrder:
    """Delivers one request's :class:`StreamEvent` s in order, once each.

    Events of an attempt carry ``index`` 0, 1, …; after a broker outage the
    head publishes them again (:class:`StreamReplay`), and live and replayed
    events may interleave. Events of an earlier attempt (a ring that broke)
    are dropped once a later attempt's events arrive, or once :meth:`advance`
    moves on. Events without an index (errors the controller makes itself)
    pass straight through.
    """

    def __init__(self) -> None:
        self.attempt = 0
        self.expected = 0
        self._held: dict[int, StreamEvent] = {}

    def push(self, event: StreamEvent) -> list[StreamEvent]:
        """Take one event; return the events now deliverable, in order (often just ``[event]``)."""
        if event.index is None:
            return [event]
        if event.attempt < self.attempt:
            return []
        if event.attempt > self.attempt:
            self.advance(event.attempt)
        if event.index < self.expected:
            return []
        self._held[event.index] = event
        out = []
        while self.expected in self._held:
            out.append(self._held.pop(self.expected))
            self.expected += 1
        return out

    @property
    def waiting(self) -> bool:
        """Events are held back behind a gap (some were lost: ask for a replay)."""
        return bool(self._held)

    def advance(self, attempt: int) -> None:
        """Accept only ``attempt``'s events from now on, from index 0."""
        self.attempt, self.expected = attempt, 0
        self._held.clear()

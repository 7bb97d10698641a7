"""The work rate an agent reports in its telemetry (:attr:`AgentStats.tokens_per_s`)."""

from __future__ import annotations

import threading
import time
from collections import deque

WINDOW = 64
"""Events (sampled tokens on the head, forwards elsewhere) the rate is taken over, at most."""
IDLE_FACTOR = 8.0
"""A pause longer than this many mean gaps of the run so far ends the run ..."""
IDLE_MIN_S = 1.0
"""... but never one shorter than this (seconds) ..."""
FIRST_GAP_S = 30.0
"""... and after the run's first event only one longer than this (a slow ring may take seconds per token)."""


class WorkRate:
    """Work per second over an agent's most recent run of work.

    The work is tokens sampled on the head, rows computed elsewhere. A run is a
    stretch of work without a pause: it starts with :meth:`restart` (the head: a
    request arrives while none is active) or after a pause (see :data:`IDLE_FACTOR`).
    The rate is that of the run's last :data:`WINDOW` events, from the first to the
    last: while an answer is generated its current rate, afterwards that answer's
    rate, until the next run has two events. A rate over the fixed intervals of the
    telemetry read 0.0 in any interval without work, e.g. at once after an answer,
    and too little in an interval an answer only partly covered.

    Thread-safe (the head samples on worker threads).
    """

    def __init__(self, window: int = WINDOW, clock=time.monotonic):
        self._events: deque[tuple[float, int]] = deque(maxlen=window)  # (time, amount)
        self._last = 0.0  # the rate of the run before
        self._clock = clock
        self._lock = threading.Lock()

    def add(self, amount: int = 1, now: float | None = None) -> None:
        """``amount`` work done at ``now`` (default: the clock's time)."""
        now = self._clock() if now is None else now
        with self._lock:
            if self._events and now - self._events[-1][0] > self._idle_gap():
                self._restart()
            self._events.append((now, amount))

    def restart(self) -> None:
        """A new run begins (the rate of the one before stays until it has two events)."""
        with self._lock:
            self._restart()

    def per_s(self) -> float:
        """The current run's rate, or the run before's while this one has fewer than two events; 0.0 before any."""
        with self._lock:
            rate = self._rate()
            return self._last if rate is None else rate

    def _restart(self) -> None:
        rate = self._rate()
        if rate is not None:
            self._last = rate
        self._events.clear()

    def _idle_gap(self) -> float:
        ev = self._events
        if len(ev) < 2:
            return FIRST_GAP_S
        return max(IDLE_MIN_S, IDLE_FACTOR * (ev[-1][0] - ev[0][0]) / (len(ev) - 1))

    def _rate(self) -> float | None:
        ev = self._events
        if len(ev) < 2 or ev[-1][0] <= ev[0][0]:
            return None
        return sum(amount for _, amount in list(ev)[1:]) / (ev[-1][0] - ev[0][0])

"""Admission of requests: a fixed set of KV sequences, a bounded FIFO queue in front of them, and the
ready generations that decide which plan a waiting request starts on.

Every request in flight owns one sequence (``seq_id``) in every window's KV
cache, as in llama.cpp's server slots; the ring then carries several
requests at once, each device working on whichever token reaches it. A
request that finds every sequence busy waits in a first-in-first-out queue;
when the queue is full it is refused (the API's 429).

Across re-plans, :class:`Admission` keeps order: requests that waited through a re-plan start
on the plan that ended their wait, even when agents joined meanwhile; requests that arrive
once a join is pending wait for the join's plan.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from homering.errors import HomeringError


class QueueFull(HomeringError):
    """Every sequence is busy and the waiting queue holds ``max_queue`` requests."""


class Sequences:
    """``n`` sequence ids (0 … n-1) handed out first come, first served.

    Args:
        n: sequences (requests served at once); ``Plan.n_parallel``.
        max_queue: requests that may wait for a sequence; one more is refused.
    """

    def __init__(self, n: int, max_queue: int):
        if n < 1 or max_queue < 0:
            raise ValueError("need at least one sequence and a queue of size >= 0")
        self.n = n
        self.max_queue = max_queue
        self._free = list(range(n))
        self._waiters: deque[asyncio.Future] = deque()
        self.busy_since: float | None = None
        """Since when (monotonic seconds) no sequence has been free; None while one is."""

    @property
    def in_use(self) -> int:
        """Sequences taken by requests."""
        return self.n - len(self._free)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a sequence."""
        return sum(not f.done() for f in self._waiters)

    async def acquire(self) -> int:
        """A free sequence id, waiting in line for one when all are busy.

        Raises:
            QueueFull: no sequence is free and the queue is full.
        """
        if self._free and not self.queue_depth:
            seq = self._free.pop(0)
            if not self._free:
                self.busy_since = time.monotonic()
            return seq
        if self.queue_depth >= self.max_queue:
            raise QueueFull(
                f"all {self.n} sequences are busy and {self.max_queue} request(s) are waiting; try again later"
            )
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed a sequence just as the waiter left
                self.release(fut.result())
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def release(self, seq_id: int) -> None:
        """Give ``seq_id`` back: to the longest waiter, or to the free list."""
        if not 0 <= seq_id < self.n or seq_id in self._free:
            raise ValueError(f"sequence {seq_id} is not in use")
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(seq_id)
                return
        self._free.append(seq_id)
        self._free.sort()
        self.busy_since = None


class Admission:
    """Which plan a request may start on: the ready generations and the join that drains the plan in force.

    ``generation`` counts the plans that became ready. A request notes the generation when it
    begins to wait; it may start once a plan is ready (:meth:`plan_ready`) and, while agents
    joined and the plan in force drains (:meth:`drain`), only if it waited since before that
    plan became ready. The controller's state machine (:class:`~homering.controller.planning.Planning`)
    opens and closes the gate; the re-planning loop drains it.

    Args:
        n_parallel: KV sequences (requests served at once).
        max_queue: requests that may wait for a sequence.
    """

    def __init__(self, n_parallel: int, max_queue: int):
        self.sequences = Sequences(n_parallel, max_queue)
        self.generation = 0
        self.open = False
        self.draining = False

    def plan_ready(self) -> None:
        """A plan became ready: a new generation (unless one already was), and no join is pending on it."""
        if not self.open:
            self.generation += 1
            self.draining = False
        self.open = True

    def plan_gone(self) -> None:
        """No plan serves requests now (re-planning, waiting, failed)."""
        self.open = False

    def drain(self, joined: bool) -> None:
        """Agents joined (``joined``), or the joiners left again: while draining, new requests wait for the
        next plan and those already running finish."""
        self.draining = joined

    def admits(self, generation: int) -> bool:
        """May a request that began waiting at ``generation`` start now?

        Requests that waited through a re-plan start on the plan that ended the wait even if agents
        have joined since; requests that arrive while draining wait for the join's plan. Without
        this, a join could re-plan again before the waiting requests ran, and they would wait
        through a second re-plan.
        """
        return self.open and (not self.draining or generation < self.generation)

"""Waiting for the cluster to change: one wake-up signal for everything the controller waits on.

Every message the controller reads and every transition of its state calls :meth:`Changes.notify`;
a coroutine that waits for a condition (a plan loaded, a link probe answered, a request admissible)
re-checks its predicate after each notification, and every ``poll`` seconds for predicates that
depend on time (a heartbeat's silence, a join's hold).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Changes:
    """A level-triggered wake-up for predicate waiters (an ``asyncio.Event`` they clear before waiting)."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Something changed: every waiter re-checks its predicate."""
        self._event.set()

    async def wait_for(
        self, predicate: Callable[[], bool], timeout: float | None, *, poll: float | None = None
    ) -> bool:
        """Wait until ``predicate()`` holds (re-checked on every :meth:`notify`, and every ``poll`` seconds);
        False when ``timeout`` seconds (None: no limit) passed first.

        ``predicate`` must not change state: it may run any number of times.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None else float("inf")
        while not predicate():
            self._event.clear()
            left = deadline - loop.time()
            if left <= 0:
                return False
            wait = min(left, poll) if poll is not None else left
            try:
                await asyncio.wait_for(self._event.wait(), None if wait == float("inf") else wait)
            except asyncio.TimeoutError:
                if loop.time() >= deadline:
                    return predicate()
        return True

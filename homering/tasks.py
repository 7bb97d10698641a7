"""Background tasks whose failures are seen: :class:`Tasks` keeps them and logs what they raise."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("homering.tasks")


class Tasks:
    """The background tasks of one owner (a controller, an agent): spawned, kept alive, their errors logged.

    asyncio keeps only weak references to tasks, and an exception in a task nobody awaits vanishes;
    :meth:`spawn` keeps a strong reference until the task ends and logs any exception it raised.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str | None = None) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; an exception it raises is logged (with its traceback)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("%s: background task %s failed: %r", self.owner, task.get_name(), exc, exc_info=exc)

    def cancel_all(self) -> None:
        """Cancel every task still running."""
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)


def cancelling(task: asyncio.Task[Any] | None = None) -> bool:
    """True while ``task`` (by default the current one) is being cancelled.

    ``Task.cancelling()`` came with Python 3.11 (calling it on 3.10 raised AttributeError); Python 3.10 has
    no way to tell and gets False, so there a cancellation that a library turned into another exception
    is not seen.
    """
    task = task if task is not None else asyncio.current_task()
    probe = getattr(task, "cancelling", None)  # absent on Python 3.10
    return bool(probe is not None and probe())

"""A gate for threads that use a resource another thread may close: :class:`Gate`."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Gate:
    """The threads using a resource (a ring's windows, the head's draft model): users :meth:`enter` and
    :meth:`exit`; closing lets no new one in, and either waits until none is left (:meth:`wait_idle`) or
    frees the resource when the last one exits (``close(then=…)``): llama.cpp must not free a context another
    thread decodes on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._users = 0
        self._closing = False
        self._then: Callable[[], None] | None = None

    def enter(self) -> bool:
        """Start using the resource; False once the gate is closing."""
        with self._cond:
            if self._closing:
                return False
            self._users += 1
            return True

    def exit(self) -> None:
        """Stop using the resource (after a successful :meth:`enter`); the last user out of a closing gate
        runs its ``then``."""
        with self._cond:
            self._users -= 1
            self._cond.notify_all()
            then = self._take_then()
        if then is not None:
            then()

    def close(self, then: Callable[[], None] | None = None) -> None:
        """Let no new user in; ``then`` runs once no user is left: now if none is, else in the last
        :meth:`exit` (on that thread)."""
        with self._cond:
            self._closing = True
            self._then = then
            then = self._take_then()
        if then is not None:
            then()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no thread uses the resource; False after ``timeout`` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: self._users == 0, timeout)

    def _take_then(self) -> Callable[[], None] | None:
        """``then``, once, when the gate is closing and idle (the lock held)."""
        if not (self._closing and self._users == 0):
            return None
        then, self._then = self._then, None
        return then

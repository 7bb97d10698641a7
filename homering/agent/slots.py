"""The head's requests in flight: a :class:`Slot` per request, held by :class:`Slots` (one lock).

A slot is where a request's frames come back to its generation loop (a queue only a link thread and that
loop touch) and how the event loop stops it (the ``cancelled`` and ``interrupted`` events).
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from homering.errors import HomeringError
from homering.wire import Frame


class Interrupted(Exception):
    """The request's ring broke or was replaced (the controller resumes it on the new ring)."""


@dataclass(frozen=True)
class _Stop:
    """Put in a slot's queue instead of a frame: the request must stop waiting (``why``)."""

    why: str


@dataclass(eq=False)
class Slot:
    """One request the head is generating.

    ``number`` (32 bits) is what its frames carry as ``request_id``; its frames come back on a queue that
    only :meth:`put` (a link thread) and :meth:`wait` (its generation loop) touch. ``cancelled`` (the client
    went away) and ``interrupted`` (the ring broke or is being replaced) are events: set from the event
    loop, read by the generation loop between tokens.
    """

    request_id: str
    seq_id: int
    number: int
    embed: bool = False  # the head's last window returns every token's embedding (set before frames go out)
    cancelled: threading.Event = field(default_factory=threading.Event)
    interrupted: threading.Event = field(default_factory=threading.Event)
    _back: queue.Queue[Any] = field(default_factory=queue.Queue, init=False, repr=False)

    def put(self, frame: Frame) -> None:
        """A frame of this request came back (a link thread)."""
        self._back.put(frame)

    def interrupt(self) -> None:
        """End the request with ``interrupted`` at its next ring step (wakes a loop waiting for frames)."""
        self.interrupted.set()
        self._back.put(_Stop("interrupted"))

    def fail(self, why: str) -> None:
        """Frames of this request were lost (``why``): its loop stops waiting for them."""
        self._back.put(_Stop(why))

    def wait(self, timeout: float) -> Frame:
        """The next frame back (its generation loop).

        Raises:
            Interrupted: interrupted, frames lost, or nothing came back within ``timeout`` seconds.
        """
        try:
            got = self._back.get(timeout=timeout)
        except queue.Empty:
            raise Interrupted(f"the ring did not answer within {timeout:.0f} s (a data-plane timeout)") from None
        if isinstance(got, _Stop):
            raise Interrupted(got.why)
        return got


class Slots:
    """The head's requests in flight, by sequence, request number and request id (one lock)."""

    def __init__(self, n_parallel: int) -> None:
        self.n_parallel = n_parallel
        self._lock = threading.Lock()
        self._by_seq: dict[int, Slot] = {}
        self._by_number: dict[int, Slot] = {}
        self._numbers = itertools.count(1)

    def claim(self, request_id: str, seq_id: int) -> tuple[Slot, bool]:
        """Take sequence ``seq_id`` for ``request_id``: (its slot, whether no other request was in flight).

        Raises:
            HomeringError: the sequence does not exist or is busy.
        """
        if seq_id >= self.n_parallel:
            raise HomeringError(f"sequence {seq_id} does not exist (the plan has {self.n_parallel})")
        with self._lock:
            busy = self._by_seq.get(seq_id)
            if busy is not None:
                raise HomeringError(f"sequence {seq_id} is busy with request {busy.request_id}")
            slot = Slot(request_id, seq_id, next(self._numbers) & 0xFFFFFFFF)
            first = not self._by_seq
            self._by_seq[seq_id] = slot
            self._by_number[slot.number] = slot
            return slot, first

    def release(self, slot: Slot) -> None:
        """The request is over: its sequence is free (releasing twice is harmless)."""
        with self._lock:
            if self._by_seq.get(slot.seq_id) is slot:
                del self._by_seq[slot.seq_id]
            self._by_number.pop(slot.number, None)

    def get(self, number: int) -> Slot | None:
        """The slot whose frames carry request number ``number``, if it is in flight."""
        with self._lock:
            return self._by_number.get(number)

    def find(self, request_id: str) -> Slot | None:
        """The slot of request ``request_id``, if it is in flight."""
        with self._lock:
            return next((s for s in self._by_seq.values() if s.request_id == request_id), None)

    def all(self) -> list[Slot]:
        """Every slot in flight (a copy)."""
        with self._lock:
            return list(self._by_seq.values())

    def fail(self, numbers: set[int], why: str) -> None:
        """Wake the requests ``numbers`` whose frames were lost."""
        for n in numbers:
            slot = self.get(n)
            if slot is not None:
                slot.fail(why)

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_seq)

"""The plan an agent has loaded: its windows, the link to its successor, and on the head the requests in flight.

A :class:`Ring` is built by :mod:`homering.agent.loading` and used by three kinds of threads at once: the
link threads (:mod:`homering.agent.forwarding`), the head's generation loops
(:mod:`homering.agent.generation`) and the event loop (cancels, interrupts, telemetry, plan replacement).
Every piece of state they share has one owner with its own lock:

- :class:`Link`: the socket to the successor, and the lock that keeps a group of frames whole on it;
- :class:`~homering.agent.slots.Slots`: the head's requests in flight, each a
  :class:`~homering.agent.slots.Slot` (its KV sequence, the request number its frames carry, the queue they
  come back on, its cancel and interrupt flags);
- :class:`Batcher`: the head's groups of decode steps (frames waiting, requests sampling, frames in the ring);
- :class:`~homering.gate.Gate`: the threads using the windows, which closing the ring waits for;
- :class:`~homering.agent.telemetry.WindowMeter`: the work done per window.

Lock order: a :class:`Batcher`'s lock may be held while taking a :class:`Link`'s or the :class:`Slots`'
lock; no other lock is held while taking another.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

from homering.agent.slots import Slot, Slots
from homering.agent.telemetry import WindowMeter
from homering.engine.pages import WindowPages
from homering.engine.window import LayerWindow
from homering.errors import HomeringError
from homering.gate import Gate
from homering.transport.links import send_frame, send_group
from homering.wire import Frame, Plan

log = logging.getLogger("homering.agent")

SHUTDOWN_TIMEOUT_S = 30.0
"""How long replacing a plan waits for the threads that still use its windows, seconds."""


class Link:
    """The link to the successor: one blocking socket, one lock so that groups of frames never interleave."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def hello(self, tag: int) -> None:
        """Name the plan the frames on this link belong to (the first frame on a ring link)."""
        with self._lock:
            send_frame(self._sock, Frame.hello(tag))

    def send(self, frames: list[Frame]) -> None:
        """Send ``frames`` as one group. Raises OSError when the link is broken."""
        with self._lock:
            send_group(self._sock, frames)

    def shutdown(self) -> None:
        """Unblock a send to a neighbour that is gone."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket (after :meth:`shutdown`, or when no thread sends any more)."""
        self._sock.close()


def lost(frames: list[Frame], exc: BaseException, slots: Slots) -> None:
    """Frames that could not be sent to the next agent: say so, and wake the head's requests they belong to."""
    numbers = {f.header.request_id for f in frames}
    log.warning(
        "cannot reach the next agent: %s; dropped %d frame(s) of %d request(s) (sequences %s)",
        exc,
        len(frames),
        len(numbers),
        sorted({f.header.seq_id for f in frames}),
    )
    slots.fail(numbers, f"cannot reach the next agent: {exc}")


class Batcher:
    """The head's batching of decode steps.

    The requests in flight are spread over as many groups as the ring has devices that can compute at once
    (:attr:`Plan.pipeline_depth`), so that every such device has a group to work on (the pipeline,
    PRIMA.CPP's piped ring); requests beyond that share groups, whose tokens share each window's
    llama_decode (llama.cpp server's continuous batching). A group is sent when it is full, or when no
    request whose frames came back ("thinking": sampling its next token) could still join it.
    """

    def __init__(self, link: Link, slots: Slots, depth: int) -> None:
        self._link = link
        self._slots = slots
        self._depth = depth
        self._lock = threading.Lock()
        self._thinking: set[int] = set()  # requests sampling their next token
        self._outstanding: dict[int, int] = {}  # frames in the ring, by request number
        self._pending: list[Frame] = []  # frames waiting for the thinking requests

    def submit(self, number: int, frames: list[Frame]) -> None:
        """Queue request ``number``'s frames; send the queued group once it is full or no request is thinking."""
        with self._lock:
            self._thinking.discard(number)
            self._outstanding[number] = self._outstanding.get(number, 0) + len(frames)
            self._pending.extend(frames)
            cap = -(-len(self._slots) // self._depth)  # requests per group: one group per such device
            if not self._thinking or len({f.header.request_id for f in self._pending}) >= cap:
                self._flush()

    def returned(self, number: int, waited: bool) -> None:
        """A frame of request ``number`` came back; ``waited``: its generation loop still waits for it."""
        with self._lock:
            left = self._outstanding.get(number, 0) - 1
            if waited and left <= 0:
                self._thinking.add(number)  # it will sample and submit (or leave) next
            if left > 0:
                self._outstanding[number] = left
            else:
                self._outstanding.pop(number, None)

    def leave(self, number: int) -> None:
        """Request ``number`` is over: stop waiting for it (a lost link is reported to the frames' requests)."""
        with self._lock:
            self._thinking.discard(number)
            self._outstanding.pop(number, None)
            if not self._thinking:
                self._flush()

    def _flush(self) -> None:  # under self._lock
        if not self._pending:
            return
        frames, self._pending = self._pending, []
        try:
            self._link.send(frames)
        except OSError as exc:
            for n in {f.header.request_id for f in frames}:
                self._outstanding.pop(n, None)
                self._thinking.discard(n)
            lost(frames, exc, self._slots)


class Ring:
    """What an agent holds for its current plan: its place in the ring and its windows (one per round).

    Args:
        plan: the plan.
        position: this agent's index in ``plan.ring`` (the head is the last).
        windows: this agent's layer windows, in round order.
        release: drop each window from the page cache after use.
        pages: page-cache advice per window (k > 1; see :mod:`homering.engine.pages`).
    """

    def __init__(
        self,
        plan: Plan,
        position: int,
        windows: list[LayerWindow],
        *,
        release: bool = False,
        pages: list[WindowPages] | None = None,
    ) -> None:
        self.plan = plan
        self.position = position
        self.windows = windows
        self.release_pages = release
        self.pages = pages or []
        self.tag = plan.tag  # HELLO frames of this plan's links carry it
        self.is_head = position == len(plan.ring) - 1
        self.meter = WindowMeter(plan.ring[position].windows, count_rows=not self.is_head)
        self.slots = Slots(plan.n_parallel)
        self.gate = Gate()
        self.link: Link | None = None
        self.batcher: Batcher | None = None

    def connect(self, sock: socket.socket) -> None:
        """Use ``sock`` (connected and past the handshake) as the link to the successor; send HELLO."""
        self.link = Link(sock)
        self.link.hello(self.tag)
        if self.is_head:
            self.batcher = Batcher(self.link, self.slots, self.plan.pipeline_depth or len(self.plan.ring))

    # ------------------------------------------------------------ the head's requests
    def claim(self, request_id: str, seq_id: int) -> Slot:
        """Take sequence ``seq_id`` for a request (the head).

        Raises:
            HomeringError: the sequence does not exist or is busy, or the ring is being replaced.
        """
        slot, first = self.slots.claim(request_id, seq_id)
        if not self.gate.enter():
            self.slots.release(slot)
            raise HomeringError(f"plan {self.plan.plan_id} is being replaced")
        if first:  # the head was idle: a new run of work (the telemetry's rate)
            self.meter.rate.restart()
        return slot

    def release(self, slot: Slot) -> None:
        """The request of ``slot`` is over (call once)."""
        if self.batcher is not None:
            self.batcher.leave(slot.number)
        self.slots.release(slot)
        self.gate.exit()

    def submit(self, slot: Slot, frames: list[Frame]) -> None:
        """Send a request's frames into the ring (batched with other requests'; see :class:`Batcher`)."""
        if self.batcher is None:
            raise HomeringError("this agent does not head a ring of several agents")
        self.batcher.submit(slot.number, frames)

    def deliver(self, number: int, frame: Frame) -> None:
        """A frame of request ``number`` came back to the head: hand it to the request's generation loop."""
        slot = self.slots.get(number)
        if self.batcher is not None:
            self.batcher.returned(number, slot is not None)
        if slot is not None:
            slot.put(frame)

    def embeds(self, number: int) -> bool:
        """Request ``number`` (the head's) asks for embeddings, not logits (:mod:`homering.agent.embedding`)."""
        slot = self.slots.get(number)
        return slot is not None and slot.embed

    def pass_on(self, frames: list[Frame]) -> None:
        """Send frames to the successor as one group (a link thread); a broken link is logged and the
        head's requests whose frames were lost end at once."""
        if self.link is None:
            return
        try:
            self.link.send(frames)
        except OSError as exc:
            lost(frames, exc, self.slots)

    def cancel(self, request_id: str, *, interrupt: bool) -> bool:
        """Stop a request at its next token: ``interrupted`` (``interrupt``) or ``done`` with ``cancelled``.
        False when no such request is in flight."""
        slot = self.slots.find(request_id)
        if slot is None:
            return False
        if interrupt:
            slot.interrupt()
        else:
            slot.cancelled.set()
        return True

    def interrupt(self) -> None:
        """End every request in flight with ``interrupted`` at its next ring step."""
        for slot in self.slots.all():
            slot.interrupt()

    # ------------------------------------------------------------ windows
    def after_window(self, round_: int) -> None:
        """Window ``round_`` is done and its output handed off: advise the kernel about the windows.

        PRIMA.CPP's prefetching: read the next round's window now, so the disk works while the rest of the
        ring computes (``WILLNEED``, does not block). With ``release`` (devices whose windows overflow their
        RAM), first drop the window just used, so the kernel evicts it rather than the next one. See
        :mod:`homering.engine.pages`.
        """
        if len(self.pages) > 1:
            if self.release_pages:
                self.pages[round_].release()
            self.pages[(round_ + 1) % len(self.pages)].prefetch()

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Interrupt every request, wait until no thread uses the windows any more, then close them."""
        self.gate.close()
        self.interrupt()
        if self.link is not None:
            self.link.shutdown()
        if not self.gate.wait_idle(timeout):
            log.warning("windows still in use after %.0f s; closing them anyway", timeout)
        self.close()

    def close(self) -> None:
        """Close the link, the windows and the page advice (no thread may use them any more)."""
        if self.link is not None:
            self.link.close()
        for w in self.windows:
            w.close()
        for p in self.pages:
            p.close()
        self.pages = []

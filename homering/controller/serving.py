"""Serving requests: admit, send to the head, pass its stream on in order, resume after a broken ring.

:class:`RequestService` owns the requests in flight (:class:`~homering.controller.requests.Runs`,
one :class:`~homering.controller.requests.RequestRun` each) and the tokenizer. A request gets one
of the ``n_parallel`` KV sequences (waiting in the FIFO queue when all are busy), waits for a plan
it may start on (:class:`~homering.controller.admission.Admission`), and goes to the head as a
:class:`~homering.wire.GenerateJob`; the head streams the answer to the request's topic. When the
ring breaks mid-answer the request resumes on the next plan from the tokens already streamed: the
head replays prompt + tokens so far to rebuild the KV caches (Petals' recovery by replay).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Protocol

from homering.api.view import RequestRefused
from homering.controller.admission import QueueFull
from homering.controller.changes import Changes
from homering.controller.membership import Membership
from homering.controller.planning import Planning, PlanSettings
from homering.controller.requests import RequestError, RequestRun, Runs, prompt_ids
from homering.engine.drafting import Speculative, with_default
from homering.engine.tokenizer import Tokenizer
from homering.tasks import Tasks
from homering.transport.bus import Bus
from homering.wire import (
    END_EVENTS,
    CancelJob,
    ControllerState,
    EventType,
    GenerateRequest,
    StreamEvent,
    StreamReplay,
    Topics,
)

log = logging.getLogger("homering.controller")


class RequestMetrics(Protocol):
    """What the service counts (:class:`homering.api.metrics.Metrics` is one)."""

    def finished(self, event: StreamEvent, seconds: float) -> None:
        """A request ended with ``event`` (``done`` or ``error``), ``seconds`` after it asked for a sequence."""

    def count(self, outcome: str) -> None:
        """A request ended without an answer: ``queue_full``, ``cancelled``."""


class RequestService:
    """Runs requests on the plan in force.

    Args:
        settings: the context of one sequence (``n_ctx``); a request waits for a plan to start or resume
            on at most ``5 * join_timeout``.
        bus: publishes jobs, cancellations and replay requests (and refusals of MQTT requests).
        tasks: runs background sends.
        planning: the plan in force, the controller's state, and admission (sequences, queue, generations).
        membership: whether a head is still live.
        changes: wakes the waits for a plan.
        metrics: counts finished and refused requests.
    """

    def __init__(
        self,
        settings: PlanSettings,
        bus: Bus,
        tasks: Tasks,
        planning: Planning,
        membership: Membership,
        changes: Changes,
        metrics: RequestMetrics,
    ) -> None:
        self.bus = bus
        self.tasks = tasks
        self.planning = planning
        self.admission = planning.admission
        self.membership = membership
        self.changes = changes
        self.metrics = metrics
        self.n_ctx = settings.n_ctx
        self.wait_s = settings.join_timeout * 5
        self.runs = Runs()
        self.tokenizer: Tokenizer | None = None
        self.measured_ms_per_token: float | None = None
        """Of the last request that decoded 2+ tokens."""
        self._tokenizing = asyncio.Lock()  # one request at a time in the tokenizer's thread
        self.speculative: Speculative | None = None
        """The controller's --draft: completes each request's speculative settings."""

    # ------------------------------------------------------------------ a request
    async def submit(self, req: GenerateRequest) -> AsyncGenerator[StreamEvent, None]:
        """Admit a request and yield its stream events up to and including ``done`` or ``error``.

        When the consumer stops early (a client that disconnected), the head is told to cancel;
        the sequence is free again once the head has stopped. When the ring breaks mid-answer
        (``interrupted``, or the head lost), the request resumes on the next plan from the tokens
        already yielded: the consumer sees a pause, never a repeated or changed token. If no plan
        can be made any more, it ends with an ``error`` event.

        Raises:
            RequestError: 400/413 (see :func:`~homering.controller.requests.prompt_ids`), 429 when the
                queue is full, 503 when no plan is ready.
        """
        if self.tokenizer is None:
            raise RequestError(503, "the controller is still reading the model")
        async with self._tokenizing:  # off the event loop, which hears the agents' heartbeats
            ids = await asyncio.to_thread(prompt_ids, self.tokenizer, req, self.n_ctx)
        planning = self.planning
        if planning.plan is None or planning.state in (ControllerState.WAITING, ControllerState.ERROR):
            raise RequestError(
                503,
                "no plan is ready yet: the agents are still joining or loading"
                if planning.state != ControllerState.ERROR
                else f"the cluster failed: {planning.detail}",
            )
        t0 = time.perf_counter()  # the latency counts the wait in the queue
        if self.speculative is not None:
            req = req.model_copy(update={"speculative": with_default(req.speculative, self.speculative)})
        try:
            seq = await self.admission.sequences.acquire()
        except QueueFull as exc:
            self.metrics.count("queue_full")
            raise RequestError(429, str(exc), code="queue_full") from None
        run = RequestRun(req, ids, seq, started=t0)
        self.runs.add(run)
        finished = False
        try:
            await self._admit(run)
            await self._start(run)
            while not finished:
                event = await self._next_event(run)
                if event.type == EventType.TOKEN and event.token_id is not None:
                    run.sent.append(event.token_id)
                if event.type in (EventType.DONE, EventType.ERROR):
                    finished = True
                    self._finished(run, event)
                yield event
        finally:
            self._ended(run, finished)

    async def _admit(self, run: RequestRun) -> None:
        """Wait until the request may start (a plan it may start on is ready); then it is in flight.

        Raises:
            RequestError: 503 when no such plan came in time.
        """
        gen = self.admission.generation
        if not self.admission.admits(gen):
            run.waiting_since = gen
            waited = time.monotonic()
            try:
                if not await self.changes.wait_for(lambda: self.admission.admits(gen), self.wait_s):
                    raise RequestError(503, "the cluster is re-planning and not ready yet; try again")
            finally:
                run.waiting_since = None
            log.info(
                "request %s waited %.1f s for plan %s",
                run.request_id,
                time.monotonic() - waited,
                self.planning.plan.plan_id if self.planning.plan else None,
            )
        run.admitted = True

    async def _start(self, run: RequestRun) -> None:
        """Send the job (or, for attempt > 0, its resumption after the tokens sent) to the current plan's head."""
        plan = self.planning.plan
        assert plan is not None  # admitted: a plan is ready
        payload = self.bus.codec.encode(run.job(plan))  # may raise: then no head has it, and submit() frees it
        run.head, run.plan_id = plan.head.name, plan.plan_id
        await self.bus.publish(Topics.generate(plan.head.name), payload)

    async def _next_event(self, run: RequestRun) -> StreamEvent:
        """The next event for the consumer; an ``interrupted`` attempt resumes on the next plan (or ends
        the request with an ``error`` when no plan can be made)."""
        while True:
            event = await run.events.get()
            if event.type != EventType.INTERRUPTED:
                return event
            if event.attempt != run.attempt:
                continue  # about an attempt already given up
            why = event.error or "interrupted"
            if run.plan_id is not None:
                self.planning.ring_broken(run.plan_id, why)  # nobody re-plans otherwise (e.g. a ring that stalled)
            log.info("request %s interrupted after %d token(s) (%s); resuming", run.request_id, len(run.sent), why)
            run.resume_as_next_attempt()
            if await self._resume(run):
                continue
            failed = self.planning.failed
            return StreamEvent(
                request_id=run.request_id,
                type=EventType.ERROR,
                error=(
                    f"the cluster lost an agent and could not resume the request: {failed[1] if failed else 'no plan'}"
                ),
            )

    async def _resume(self, run: RequestRun) -> bool:
        """Wait for a plan other than the broken attempt's and resume the request on it; False when
        re-planning failed."""
        t = time.monotonic()
        old_plan = run.plan_id
        self.changes.notify()
        planning, admission = self.planning, self.admission
        gen = admission.generation
        if planning.ready and planning.plan is not None and planning.plan.plan_id != old_plan:
            gen -= 1  # the new plan is ready already: resume on it

        def settled() -> bool:  # a new plan, or the last re-plan failed (and none succeeded since)
            return planning.failed is not None or (
                admission.admits(gen) and planning.plan is not None and planning.plan.plan_id != old_plan
            )

        run.waiting_since = gen
        try:
            if not await self.changes.wait_for(settled, self.wait_s, poll=0.5) or not planning.ready:
                return False
        finally:
            run.waiting_since = None
        log.info(
            "request %s resumes on plan %s after %.1f s",
            run.request_id,
            planning.plan.plan_id if planning.plan else None,
            time.monotonic() - t,
        )
        await self._start(run)
        return True

    def _finished(self, run: RequestRun, event: StreamEvent) -> None:
        self.metrics.finished(event, time.perf_counter() - run.started)
        if event.type == EventType.DONE and event.ms_per_token and len(event.token_ids or []) > 1:
            self.measured_ms_per_token = event.ms_per_token

    def _ended(self, run: RequestRun, finished: bool) -> None:
        """The consumer is gone (finished, refused, or it left): free the sequence, or stop the head first."""
        run.reading = False
        if not run.admitted or finished or run.head is None:
            self._free(run)
        else:  # the consumer left: stop the head; the sequence frees when its end event arrives
            run.abandoned = True
            self.tasks.spawn(self._cancel(run.head, run.request_id))

    async def _cancel(self, head: str, request_id: str) -> None:
        await self.bus.publish(Topics.cancel(head), CancelJob(request_id=request_id), wait=False)
        log.info("request %s cancelled (its client left)", request_id)

    def _free(self, run: RequestRun) -> None:
        """The request is over: its sequence goes to the next in line."""
        if self.runs.get(run.request_id) is not run:
            return
        self.runs.remove(run)
        self.admission.sequences.release(run.seq)
        self.changes.notify()

    # ------------------------------------------------------------------ the bus's side
    def on_stream(self, request_id: str, event: StreamEvent) -> None:
        """A stream event from a head: in order, once, to the request's consumer (see :class:`StreamOrder`)."""
        run = self.runs.get(request_id)
        if run is None:
            return
        if run.reading and run.admitted:
            if run.deliver(event):  # some were lost (a broker outage): ask the head again
                self.tasks.spawn(self._replay(run))
        elif run.abandoned and event.type in END_EVENTS:
            self.metrics.count("cancelled")
            self._free(run)

    async def _replay(self, run: RequestRun) -> None:
        """Ask the request's head to publish its events again from the first one we miss."""
        head = run.head
        if head is None or not run.reading:
            return
        await self.bus.publish(
            Topics.replay(head),
            StreamReplay(request_id=run.request_id, attempt=run.attempt, from_index=run.order.expected),
            wait=False,
        )

    def replay_all(self) -> None:
        """After a reconnect: events published while we were away are lost; ask every head again."""
        for run in self.runs:
            if run.reading and run.admitted:
                self.tasks.spawn(self._replay(run))

    async def on_request(self, req: GenerateRequest) -> None:
        """A request over MQTT: admit it; the head streams the answer to the client's topic itself."""
        try:
            async for _ in self.submit(req):
                pass
        except RequestRefused as exc:
            log.info("request %s rejected: %s", req.request_id, exc)
            await self.bus.publish(
                Topics.stream(req.request_id),
                StreamEvent(request_id=req.request_id, type=EventType.ERROR, error=str(exc)),
            )
        except Exception as exc:  # a bug: the client still gets an answer (submit() freed the sequence)
            log.exception("request %s failed", req.request_id)
            await self.bus.publish(
                Topics.stream(req.request_id),
                StreamEvent(request_id=req.request_id, type=EventType.ERROR, error=f"internal error: {exc!r}"[:500]),
            )

    async def interrupt_all(self) -> None:
        """Tell the heads of the requests in flight to end them with ``interrupted`` (they resume later)."""
        for run in self.runs:
            if not run.running:
                continue  # not started yet, or already waiting to resume
            head = run.head
            assert head is not None
            if self.membership.live(head):
                await self.bus.publish(
                    Topics.cancel(head), CancelJob(request_id=run.request_id, interrupt=True), wait=False
                )
            elif run.reading:  # the head itself is gone: the request resumes from the tokens we saw
                run.events.put_nowait(
                    StreamEvent(
                        request_id=run.request_id,
                        type=EventType.INTERRUPTED,
                        attempt=run.attempt,
                        error=f"its head {head} was lost",
                    )
                )
            else:
                self._free(run)

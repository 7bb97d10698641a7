"""The head's requests: one :class:`HeadSession` per request, on an executor of the agent's own.

The head (the ring's last agent) takes a :class:`~homering.wire.GenerateJob`'s KV sequence, sends the
prompt's token ids into the ring, gets the logits back through its own last window, samples, and streams
the tokens as :class:`~homering.wire.StreamEvent` s. Each request's loop blocks on the ring for its whole
life, so the loops run on a thread pool of their own (:class:`Generator`), never on the event loop's
default executor, which loading and replacing plans use.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, Protocol

import numpy as np

from homering.agent.ring import Ring
from homering.agent.slots import Interrupted, Slot
from homering.agent.telemetry import StreamHistory
from homering.engine.grammar import grammar_sampler
from homering.engine.logprobs import token_logprobs
from homering.engine.sampling import SamplerChain, StopMatcher
from homering.engine.window import DecodeError
from homering.errors import HomeringError
from homering.tasks import Tasks
from homering.wire import EventType, Frame, FrameKind, GenerateJob, Plan, StreamEvent, TokenLogprob, Topics

log = logging.getLogger("homering.agent")

RING_TIMEOUT_S = 120.0
"""The head gives up on a ring that has not answered for this long, s (a plan without a prediction)."""
RING_STALL_MIN_S = 5.0
"""... or, with the plan's prediction, for this long plus :data:`RING_STALL_FACTOR` times it."""
RING_STALL_FACTOR = 20.0
MAX_REQUESTS = 256
"""Generation loops at once (Plan.n_parallel is at most this)."""

Emit = Callable[[StreamEvent], None]


def ring_stall_s(plan: Plan, frames: list[Frame]) -> float:
    """How long the head waits for a frame to come back before it calls the ring broken, seconds.

    The data-plane timeout, the third loss signal besides last wills and heartbeats (it catches a ring
    whose links broke while MQTT still works): :data:`RING_STALL_MIN_S` plus :data:`RING_STALL_FACTOR`
    times the plan's predicted time for the work ahead (the frames' tokens, or one token per sequence that
    may share the ring); :data:`RING_TIMEOUT_S` when the plan has no prediction.
    """
    if not plan.predicted_ms_per_token:
        return RING_TIMEOUT_S
    tokens = max(sum(f.header.n_tokens for f in frames), plan.n_parallel)
    return RING_STALL_MIN_S + RING_STALL_FACTOR * plan.predicted_ms_per_token / 1000 * tokens


class HeadSession:
    """One request's generation loop on the head (a worker thread): prefill, then sample and decode.

    Stops at an end-of-generation token, at a stop string (``stop``), at ``max_tokens``, at the end of the
    context, or when the controller cancels the request (its client left). When the ring breaks (an agent
    lost, a new plan), it ends with ``interrupted`` and the tokens streamed so far.

    A resumed request (``job.resume_token_ids``, the tokens an earlier attempt streamed) first replays
    prompt + those tokens through the ring, which rebuilds every window's KV cache, and streams only what
    follows (the approach of Petals' fault-tolerant inference: replay the inputs on a new route).

    Token events go to ``emit`` as they come; :meth:`run` returns the last event.
    """

    def __init__(self, ring: Ring, slot: Slot, job: GenerateJob, emit: Emit) -> None:
        self.ring, self.slot, self.job, self.emit = ring, slot, job, emit
        self.window = ring.windows[-1]
        self.resumed = list(job.resume_token_ids)
        self.prompt = np.asarray(job.prompt_token_ids + self.resumed, dtype=np.int32)
        self.tokens: list[int] = list(self.resumed)
        self.finish: Literal["stop", "length", "cancelled"] = "length"
        self.t0 = self.t_first = self.t_end = 0.0
        self.stops = StopMatcher(job.sampling.stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for tok in self.resumed:  # the text the client has: the decoder and stop matcher go on from there
            self.stops.feed(self.decoder.decode(self.window.token_bytes(tok)))

    def run(self) -> StreamEvent:
        """Generate; the ``done`` event, or ``interrupted`` when the ring broke.

        Raises:
            HomeringError, DecodeError: the prompt does not fit, a window failed.
        """
        grammar = grammar_sampler(self.window.vocab, self.job.grammar) if self.job.grammar else None
        sampler = SamplerChain(self.job.sampling, self.window.n_vocab, grammar=grammar)
        try:
            sampler.accept(self.resumed)
            self._generate(sampler)
        except (Interrupted, OSError) as exc:
            log.info("request %s interrupted after %d token(s): %s", self.job.request_id, len(self.tokens), exc)
            return StreamEvent(
                request_id=self.job.request_id, type=EventType.INTERRUPTED, token_ids=list(self.tokens), error=str(exc)
            )
        finally:
            sampler.close()
        return self._done()

    def _generate(self, sampler: SamplerChain) -> None:
        """Prefill, then per token: sample, send the token into the ring, publish it, wait for its logits.

        The next token enters the ring before its event is published: the event's work (building it, the
        event loop's MQTT publish, which takes the GIL) overlaps the ring's trip instead of delaying it.
        Whether the request ends at this token is decided first, so nothing runs past a stop.
        """
        n_ctx, job = self.ring.plan.n_ctx, self.job
        if len(self.prompt) >= n_ctx:
            raise HomeringError(f"the prompt has {len(self.prompt)} tokens but the context holds {n_ctx}")
        max_new = min(job.sampling.max_tokens - len(self.resumed), n_ctx - len(self.prompt))
        self.t0 = time.perf_counter()
        if max_new > 0 and not self.stops.stopped:
            logits = self._prefill()
            for i in range(max_new):
                self._check_interrupted()
                event, end = self._take(sampler.sample(logits))
                if event is not None and job.logprobs is not None:
                    self._add_logprob(event, logits)
                more = not end and i + 1 < max_new
                if more:
                    pending = self._start(np.array([self.tokens[-1]], dtype=np.int32), len(self.prompt) + i)
                if event is not None:
                    self.emit(event)
                if not more:
                    break
                logits = pending()
        self.t_end = time.perf_counter()

    def _prefill(self) -> np.ndarray:
        """Clear the sequence and run the prompt (and a resumed request's tokens); the last logits.

        A resumed request replays with the batch shapes of the original run (the prompt in its
        micro-batches, then each streamed token alone): other shapes give other floats, and a greedy answer
        would drift from the fault-free one some tokens later.
        """
        self._clear()
        n_prompt = len(self.job.prompt_token_ids)
        logits = self._forward(self.prompt[:n_prompt], 0)
        for i in range(len(self.resumed)):
            self._check_interrupted()
            logits = self._forward(self.prompt[n_prompt + i : n_prompt + i + 1], n_prompt + i)
        return logits

    def _take(self, tok: int) -> tuple[StreamEvent | None, bool]:
        """A token was sampled: its event (None for an end-of-generation token), and whether the request
        ends here."""
        if not self.t_first:
            self.t_first = time.perf_counter()
        if self.window.is_eog(tok) and not self.job.sampling.ignore_eos:
            self.finish = "stop"
            return None, True
        self.tokens.append(tok)
        self.ring.meter.sampled()
        text = self.stops.feed(self.decoder.decode(self.window.token_bytes(tok)))
        event = StreamEvent(request_id=self.job.request_id, type=EventType.TOKEN, token_id=tok, text=text)
        if self.stops.stopped:
            self.finish = "stop"
        elif self.slot.cancelled.is_set():
            self.finish = "cancelled"
        return event, self.finish != "length"

    def _add_logprob(self, event: StreamEvent, logits: np.ndarray) -> None:
        """Attach the token's log-probability and ``job.logprobs`` alternatives to its event."""
        assert event.token_id is not None and self.job.logprobs is not None
        lp = token_logprobs(logits, event.token_id, self.job.logprobs, self.window.token_bytes)
        event.logprob = TokenLogprob.model_validate(lp)

    def _check_interrupted(self) -> None:
        if self.slot.interrupted.is_set():
            raise Interrupted("interrupted")

    def _forward(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        """Run ``tokens`` of the request's sequence at ``pos`` through every window; the last token's logits."""
        return self._start(tokens, pos)()

    def _start(self, tokens: np.ndarray, pos: int) -> Callable[[], np.ndarray]:
        """Start running ``tokens`` at ``pos`` through every window; a function that waits for (or, on a
        one-agent ring, computes) the last token's logits ((n_vocab,) float32).

        A long prompt goes as back-to-back micro-batches of ``n_batch`` tokens, so the agents work on
        different chunks at once.
        """
        ring, seq = self.ring, self.slot.seq_id
        if len(ring.plan.ring) == 1:  # every round is here: run the windows in turn
            return lambda: self._run_here(tokens, pos)
        n_batch = ring.plan.n_batch
        frames = [
            Frame.forward(self.slot.number, seq, pos + i, tokens[i : i + n_batch])
            for i in range(0, len(tokens), n_batch)
        ]
        ring.submit(self.slot, frames)
        return lambda: self._logits(self._wait(frames), pos)

    def _run_here(self, tokens: np.ndarray, pos: int) -> np.ndarray:
        """Every window of a one-agent ring in turn; the last token's logits."""
        ring, logits = self.ring, None
        x: np.ndarray | None = tokens
        for r, w in enumerate(ring.windows):
            out = ring.meter.timed(r, len(tokens), w.forward, x, pos, self.slot.seq_id)
            x, logits = out.hidden, out.logits
        return self._logits(logits, pos)

    @staticmethod
    def _logits(logits: np.ndarray | None, pos: int) -> np.ndarray:
        if logits is None:
            raise DecodeError(f"the ring gave no logits for position {pos}")
        return logits

    def _clear(self) -> None:
        """Empty the request's sequence in every window of the ring."""
        if len(self.ring.plan.ring) == 1:
            for w in self.ring.windows:
                w.kv_remove(self.slot.seq_id, 0)
        else:
            self._through_ring([Frame.kv_remove(self.slot.number, self.slot.seq_id, 0)])

    def _through_ring(self, frames: list[Frame]) -> np.ndarray | None:
        """Send frames into the ring; wait until each came back through the head's window (:meth:`_wait`)."""
        self.ring.submit(self.slot, frames)
        return self._wait(frames)

    def _wait(self, frames: list[Frame]) -> np.ndarray | None:
        """Wait until each of ``frames`` (sent) came back through the head's window.

        Returns the logits ((n_vocab,) float32) of the last frame's last token, or None for frames that
        carry no tokens.

        Raises:
            DecodeError: a window on the way failed (the ERROR frame's message).
            Interrupted: the request was interrupted, the ring did not answer in time (:func:`ring_stall_s`),
                or the link to the next agent failed.
        """
        timeout = ring_stall_s(self.ring.plan, frames)
        logits = None
        for _ in frames:
            got = self.slot.wait(timeout)
            if got.header.kind is FrameKind.ERROR:
                raise DecodeError(got.payload)
            logits = got.payload if isinstance(got.payload, np.ndarray) else logits
        return logits

    def _done(self) -> StreamEvent:
        new = len(self.tokens) - len(self.resumed)
        steps = max(1, new - 1) if self.finish == "length" else max(1, new)
        stops = self.stops
        tail = "" if stops.stopped else stops.feed(self.decoder.decode(b"", final=True)) + stops.flush()
        t_first = self.t_first
        return StreamEvent(
            request_id=self.job.request_id,
            type=EventType.DONE,
            text=tail,
            token_ids=self.tokens,
            prompt_token_ids=self.job.prompt_token_ids,
            finish_reason=self.finish,
            ttft_ms=(t_first - self.t0) * 1000 if t_first and not self.resumed else None,
            ms_per_token=(self.t_end - t_first) * 1000 / steps if t_first and self.t_end else None,
        )


class Session(Protocol):
    """What :class:`Generator` runs for a request (a :class:`HeadSession`, or a stand-in in tests)."""

    def run(self) -> StreamEvent:
        """Generate (token events go to the ``emit`` it was made with); the request's last event."""
        ...


SessionFactory = Callable[[Ring, Slot, GenerateJob, Emit], Session]


class Generator:
    """Serves the head's :class:`~homering.wire.GenerateJob` s, several at once.

    Args:
        name: the agent's name.
        current: the loaded :class:`Ring`, or None.
        history: where the events are kept and published (:class:`StreamHistory`).
        tasks: the agent's background tasks (the event publishers).
        session: makes a request's loop [default: :class:`HeadSession`].
    """

    def __init__(
        self,
        name: str,
        current: Callable[[], Ring | None],
        history: StreamHistory,
        tasks: Tasks,
        *,
        session: SessionFactory = HeadSession,
    ) -> None:
        self.name = name
        self._current = current
        self._history = history
        self._tasks = tasks
        self._session = session
        self._executor = ThreadPoolExecutor(MAX_REQUESTS, thread_name_prefix="generate")

    def _claim(self, job: GenerateJob) -> tuple[Ring, Slot]:
        """Check that this agent heads the job's plan and take the job's sequence.

        Raises:
            HomeringError: not the head of that plan, or the sequence is not free.
        """
        ring = self._current()
        if ring is None or not ring.is_head or ring.plan.plan_id != job.plan_id:
            raise HomeringError(f"agent {self.name} is not the head of plan {job.plan_id}")
        return ring, ring.claim(job.request_id, job.seq_id)

    def _work(self, ring: Ring, slot: Slot, job: GenerateJob, emit: Emit) -> None:
        """A worker thread: run the request's session, free its sequence, then emit its last event."""
        try:
            end = self._session(ring, slot, job, emit).run()
        finally:
            ring.release(slot)
        emit(end)

    async def serve(self, job: GenerateJob) -> None:
        """Serve one request on its own sequence; its events are numbered (``index``) and kept
        (:class:`StreamHistory`) so that they can be published again after a broker outage. Any failure
        ends the stream with an ``error`` event, so that the controller frees the sequence."""
        loop = asyncio.get_running_loop()
        kept = self._history.open(job.request_id)
        live: asyncio.Queue[StreamEvent | None] = asyncio.Queue()
        publisher = self._tasks.spawn(
            self._history.publish(Topics.stream(job.request_id), live), name=f"stream {job.request_id}"
        )

        def emit(event: StreamEvent) -> None:
            event.attempt, event.index = job.attempt, len(kept)
            kept.append(event)
            loop.call_soon_threadsafe(live.put_nowait, event)

        try:
            ring, slot = self._claim(job)
            try:
                running = loop.run_in_executor(self._executor, self._work, ring, slot, job, emit)
            except RuntimeError:  # the agent is stopping
                ring.release(slot)
                raise
            await running
        except (DecodeError, HomeringError, ConnectionError, OSError, ValueError, RuntimeError) as exc:
            log.warning("request %s failed: %s", job.request_id, exc)
            emit(StreamEvent(request_id=job.request_id, type=EventType.ERROR, error=str(exc)))
        except Exception as exc:  # a bug: the request still ends, with an error, and frees its sequence
            log.exception("request %s failed", job.request_id)
            emit(StreamEvent(request_id=job.request_id, type=EventType.ERROR, error=f"internal error: {exc!r}"))
        finally:
            # after the events emit() scheduled (call_soon_threadsafe): an error emitted just above came
            # after the end marker, and was never sent
            loop.call_soon(live.put_nowait, None)
            await publisher

    def close(self) -> None:
        """Stop taking requests (running loops end on their own: the ring interrupts them)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

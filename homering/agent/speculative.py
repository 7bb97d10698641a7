"""Speculative decoding on the head: draft γ tokens, verify them all in one trip around the ring.

A :class:`SpeculativeSession` is a :class:`~homering.agent.generation.HeadSession` whose trips carry the
last kept token plus γ draft tokens (:mod:`homering.engine.drafting`) as one FORWARD frame with
:data:`~homering.wire.FLAG_ROWS`: every window decodes the γ + 1 tokens as one batch at positions
n … n + γ, and the head's last window returns the logits of all of them. The head keeps the longest prefix
of drafts its own sampler agrees with plus one token (:func:`~homering.engine.drafting.verify_rows`); the
next trip starts with a KV_REMOVE frame in the same group, so every window drops the rejected positions
(``llama_memory_seq_rm`` from the first one) before it decodes. γ adapts (:class:`GammaChooser`). A
prompt lookup's next trip goes before this one is back (:meth:`SpeculativeSession._send_ahead`).

Sources: Leviathan et al. 2023, "Fast inference from transformers via speculative decoding"; Chen et al.
2023, "Accelerating large language model decoding with speculative sampling"; prima.cpp's speculative ring.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from homering.agent.embedding import EmbedSession
from homering.agent.gamma import AHEAD_MIN, GammaChooser
from homering.agent.generation import Emit, HeadSession, Session, ring_stall_s
from homering.agent.ring import Ring
from homering.agent.slots import Slot
from homering.engine.draft_model import ModelDrafter
from homering.engine.drafting import Drafter, NgramDrafter, Speculative, verify_rows
from homering.engine.sampling import SamplerChain
from homering.errors import HomeringError
from homering.models.vocab import vocabulary_mismatch
from homering.wire import Frame, GenerateJob, StreamEvent

log = logging.getLogger("homering.agent")


class SpeculativeSession(HeadSession):
    """A request's loop with speculative decoding (see the module's text); greedy and seeded answers are the
    same tokens as :class:`HeadSession`'s. ``drafted``/``accepted`` count its draft tokens."""

    def __init__(
        self,
        ring: Ring,
        slot: Slot,
        job: GenerateJob,
        emit: Emit,
        drafter: Drafter,
        s: Speculative,
        gamma: GammaChooser,
    ):
        super().__init__(ring, slot, job, emit)
        self.drafter, self.s, self.gamma = drafter, s, gamma
        self.drafted = self.accepted = self.trips = 0
        self.trip_ms = self.draft_ms = 0.0  # in all: around the ring, and drafting (or waiting for a draft ahead)
        self._last: tuple[int, int, float, float, float] | None = None  # γ, drafted, trip/draft/catch-up ms
        self._sent: _Sent | None = None  # the trip sent ahead (:meth:`_send_ahead`)
        self.sent_ahead = self.ahead_kept = 0  # trips sent ahead, and those that were the next trip
        self._stale = 0  # frames of stale trips sent ahead still to come back (dropped)
        self._t_back = 0.0  # when the last trip's logits came back (perf_counter s)

    def run(self) -> StreamEvent:
        try:
            end = super().run()
        finally:
            self.drafter.forget(self.slot.seq_id)
            self.drafter.release()  # acquired by Drafters.session
        end.drafted, end.accepted, end.trips = self.drafted, self.accepted, self.trips
        log.info(
            "request %s: %d trips, %d drafted, %d kept; %.1f ms per trip around the ring, %.1f drafting",
            self.job.request_id, self.trips, self.drafted, self.accepted,
            self.trip_ms / max(1, self.trips), self.draft_ms / max(1, self.trips),
        )  # fmt: skip
        if isinstance(self.drafter, ModelDrafter):
            d = self.drafter
            log.info("drafts ahead so far: %d were the next draft, %d not", d.ahead_kept, d.ahead_lost)
        else:
            log.info("trips sent ahead: %d, %d of them the next trip", self.sent_ahead, self.ahead_kept)
        return end

    def _generate(self, sampler: SamplerChain) -> None:
        """Prefill, then trips of the last kept token + γ drafts until the request ends (never past a stop
        string or max_tokens: the kept tokens are taken one by one and the loop ends at the first end).

        As in plain decoding, the next trip enters the ring before the kept tokens' events are published, so
        their work (building them, the event loop's MQTT publish) overlaps the trip."""
        n_ctx, job = self.ring.plan.n_ctx, self.job
        if len(self.prompt) >= n_ctx:
            raise HomeringError(f"the prompt has {len(self.prompt)} tokens but the context holds {n_ctx}")
        max_new = min(job.sampling.max_tokens - len(self.resumed), n_ctx - len(self.prompt))
        self.t0 = time.perf_counter()
        if max_new > 0 and not self.stops.stopped:
            ahead = min(self.gamma.best, self.s.n_max)
            if ahead and self.gamma.alpha ** (ahead + 1) >= AHEAD_MIN:  # as a draft ahead during a trip: a draft
                # model reads the prompt and drafts the first trip's γ while the ring prefills
                self.drafter.draft_ahead(self.slot.seq_id, [int(t) for t in self.prompt], ahead + 1)
            rows, pos, new = self._prefill()[None, :], len(self.prompt), 0
            drafts: list[int] = []
            while True:
                self._check_interrupted()
                events, ended = self._keep(sampler, rows, drafts, max_new - new)
                kept = len(events)
                new += kept
                if self._last is not None:  # what the last trip cost and how much of its draft was kept
                    g, drafted, trip_ms, draft_ms, catch_up = self._last
                    log.debug(
                        "trip: γ %d, %d drafted, %d kept, %.1f ms around the ring, %.1f drafting (%.1f catching up)",
                        g, drafted, kept - 1, trip_ms, draft_ms, catch_up,
                    )  # fmt: skip
                    self.gamma.record(
                        g, drafted, trip_ms, draft_ms, accepted=min(kept - 1, drafted), catch_up_ms=catch_up,
                        token_ms=(self.drafter.token_ms or None) if isinstance(self.drafter, ModelDrafter) else None,
                    )  # fmt: skip
                sent, self._sent = self._sent, None
                if not ended:
                    pos += kept
                    pending, drafts = self._next(sent, pos, len(drafts) + 1 - kept, max_new - new)
                for event in events:
                    if event is not None:
                        self.emit(event)
                if ended:
                    break
                rows = pending()
        self.t_end = time.perf_counter()

    def _next(self, sent: _Sent | None, pos: int, hole: int, room: int) -> tuple[Callable[[], np.ndarray], list[int]]:
        """The next trip after a trip came back, whose last kept token is at ``pos - 1`` and whose ``hole``
        rejected positions the KV caches still hold: the trip ``sent`` ahead if it is valid (it starts with
        that token there), else a new one (:meth:`_trip`), after ``sent``'s positions too."""
        if sent is not None and not hole and sent.pos == pos - 1 and sent.tokens[0] == self.tokens[-1]:
            drafts = sent.tokens[1:]
            self.drafted += len(drafts)
            self.trips += 1
            self.ahead_kept += 1
            history = list(self.job.prompt_token_ids) + self.tokens + drafts
            self._send_ahead(history, sent.pos + len(sent.tokens), len(drafts), room - len(sent.tokens))
            return self._rows(sent.frames, sent.pos, len(drafts), 0.0, 0.0, self._t_back), drafts
        if sent is not None:  # stale: its frames are dropped and its positions too
            self._stale += len(sent.frames)
            hole = sent.pos + len(sent.tokens) - (pos - 1)  # every position from the next trip's first on
        return self._trip(pos - 1, hole, room)

    def _send_ahead(self, history: list[int], pos: int, gamma: int, left: int) -> None:
        """Pipelined speculation: send the next trip, at ``pos``, before the trip of ``gamma`` drafts in flight is
        back, so that at most two are in flight; ``history`` is the sequence if that trip
        keeps every draft, with ``left`` tokens left to generate after it.

        A prompt lookup after ``history`` guesses the trip's extra token and the drafts that follow it; they go
        around the ring at once as the next trip. When the first trip is back, the
        one sent ahead is the next trip if the first kept every draft and its extra token is the guess: its
        logits follow the same tokens at the same positions as a trip sent afterwards would, so answers do not
        change, and they come back right after the first trip's instead of a trip later. Otherwise it is stale:
        its frames are dropped when they come back, and the next trip's KV_REMOVE drops its positions in every
        window (the ring is FIFO, so the KV_REMOVE follows the stale trip everywhere).

        Only for prompt lookups (they cost the head nothing); while the request is alone on a ring of several
        agents (with others, their trips keep the devices busy already) with one round (an agent drops
        positions from all its windows when a KV_REMOVE passes it in the first round, and a stale trip still on
        its way to a later round would put them back); when the trip drafted and its whole draft is likely
        kept (α^(γ+1) ≥ :data:`~homering.agent.gamma.AHEAD_MIN`).

        Measured on home4 (``bench speculative``): the n-gram prompts went 1.48-1.65× plain decoding with trips
        ahead (9 invocations, 1.58× on average) against 1.44-1.47× without (4). A draft model's next draft
        already overlaps the trip (:meth:`~homering.engine.draft_model.ModelDrafter.draft_ahead`); with its
        trips sent ahead too, the F16/Q4_1 pair went 1.66-1.87× (7 invocations, 48 tokens per answer) against
        1.72-1.92× (5): the head's CPU drafts at its limit there, and the drafts ahead that a rejection wastes
        only add to it.

        The idea is pipelined speculative decoding's (PipeSpec, McDanel et al. 2025), with one trip ahead."""
        ring = self.ring
        if not (
            isinstance(self.drafter, NgramDrafter)
            and gamma > 0
            and len(ring.plan.ring) > 1
            and ring.plan.k == 1
            and len(ring.slots) == 1
            and self.gamma.alpha ** (gamma + 1) >= AHEAD_MIN
        ):
            return
        ahead = self.drafter.propose(history, min(left, ring.plan.n_ctx - pos, ring.plan.n_batch), self.s)
        if not ahead:
            return
        frames = [Frame.forward(self.slot.number, self.slot.seq_id, pos, np.asarray(ahead, dtype=np.int32), rows=True)]
        self.ring.submit(self.slot, frames)
        self._sent = _Sent(ahead, pos, frames)
        self.sent_ahead += 1

    def _keep(
        self, sampler: SamplerChain, rows: np.ndarray, drafts: list[int], room: int
    ) -> tuple[list[StreamEvent | None], bool]:
        """Sample the verified rows: each kept token's event (None for a token held back by a stop string's
        prefix), and whether the request ended."""
        events: list[StreamEvent | None] = []
        for i, tok in enumerate(verify_rows(sampler, rows, drafts)):
            event, end = self._take(tok)
            if event is not None and self.job.logprobs is not None:
                self._add_logprob(event, rows[i])
            events.append(event)
            if end or len(events) >= room:
                self.accepted += max(0, len(events) - 1)
                return events, True
        self.accepted += len(events) - 1
        return events, False

    def _trip(self, pos: int, hole: int, room: int) -> tuple[Callable[[], np.ndarray], list[int]]:
        """Draft and send the last kept token (at ``pos``) + γ drafts; a function that waits for their logits
        ((γ + 1, n_vocab)), and the drafts.

        The ``hole`` rejected positions are dropped first. While another request is in flight on the head, the
        trip refills at least as many cells: the draft is padded (with its last token) to ``hole - 1`` tokens.
        A hole left in llama.cpp's unified KV cache would take that sequence's next tokens, placed before its
        latest cells, and its logits then change (measured: up to 0.8 on SmolLM2), so answers would drift.
        Alone, no padding: a request that starts later fills the hole with its first cells, in its own order,
        and every later cell of either sequence lies beyond them."""
        left, room = room, min(room - 1, self.ring.plan.n_ctx - pos - 1, self.ring.plan.n_batch - 1)
        t0 = time.perf_counter()
        history = list(self.job.prompt_token_ids) + self.tokens
        if isinstance(self.drafter, NgramDrafter):  # a lookup is free: look first, draft as far as it is trusted
            drafts = self.drafter.propose(history, room, self.s)
            gamma = len(drafts)
        else:
            gamma = self.gamma.choose(room, self.s)
            if gamma and not self.drafter.ready(self.slot.seq_id, history):
                self.gamma.defer()  # no trip waits for the draft model to catch up: it does so in the background
                gamma = 0
            drafts = self.drafter.draft(self.slot.seq_id, history, gamma)[:gamma] if gamma else []
        catch_up = self.drafter.catch_up_ms(self.slot.seq_id) if gamma else 0.0
        whole = gamma > 0 and len(drafts) == gamma
        refill = hole - 1 if len(self.ring.slots) > 1 else 0
        drafts += [(drafts or self.tokens)[-1]] * (refill - len(drafts))
        t1 = time.perf_counter()
        tokens = np.asarray([self.tokens[-1], *drafts], dtype=np.int32)
        frames = self._verify(tokens, pos, hole > 0)
        if whole and self.gamma.alpha ** (gamma + 1) >= AHEAD_MIN:  # the next draft, while the trip runs
            self.drafter.draft_ahead(self.slot.seq_id, history + drafts, gamma + 1)
        if whole and frames is not None:
            self._send_ahead(history + drafts, pos + len(tokens), gamma, left - len(tokens))
        self.drafted += len(drafts)
        self.trips += 1
        if frames is None:  # a one-agent ring: the windows run when the logits are wanted
            here = (t1 - t0) * 1000
            return (lambda: self._timed(self._verify_here(tokens, pos, hole > 0), gamma, t1, here, catch_up)), drafts
        return self._rows(frames, pos, gamma, (t1 - t0) * 1000, catch_up, t1), drafts

    def _rows(
        self, frames: list[Frame], pos: int, gamma: int, draft_ms: float, catch_up: float, t_start: float
    ) -> Callable[[], np.ndarray]:
        """A function that waits for the logits of a trip's ``frames`` (sent) ((γ + 1, n_vocab)) and notes its
        time: around the ring since ``t_start`` (perf_counter s), after ``draft_ms`` of drafting."""

        def rows() -> np.ndarray:
            return self._timed(self._logits(self._wait(frames), pos), gamma, t_start, draft_ms, catch_up)

        return rows

    def _timed(self, logits: np.ndarray, gamma: int, t_start: float, draft_ms: float, catch_up: float) -> np.ndarray:
        """A trip's logits are back ((γ + 1, n_vocab)): note its times for the γ chooser (around the ring since
        ``t_start``, perf_counter s; ``draft_ms`` drafting before it, ``catch_up`` ms of which caught up)."""
        self._t_back = time.perf_counter()
        out = np.atleast_2d(logits)
        self._last = (gamma, out.shape[0] - 1, (self._t_back - t_start) * 1000, draft_ms, catch_up)
        self.trip_ms += self._last[2]
        self.draft_ms += self._last[3]
        return out

    def _wait(self, frames: list[Frame]) -> np.ndarray | None:
        """As :meth:`HeadSession._wait`, after dropping the frames of stale trips sent ahead (:meth:`_send_ahead`)."""
        while self._stale:
            self.slot.wait(ring_stall_s(self.ring.plan, frames))
            self._stale -= 1
        return super()._wait(frames)

    def _verify(self, tokens: np.ndarray, pos: int, stale: bool) -> list[Frame] | None:
        """Send ``tokens`` at ``pos`` … into the ring (after dropping positions >= ``pos`` when ``stale``); the
        frames sent, or None on a one-agent ring (:meth:`_verify_here` computes them when wanted)."""
        if len(self.ring.plan.ring) == 1:
            return None
        number, seq = self.slot.number, self.slot.seq_id
        frames = [Frame.kv_remove(number, seq, pos)] if stale else []
        frames.append(Frame.forward(number, seq, pos, tokens, rows=True))
        self.ring.submit(self.slot, frames)
        return frames

    def _verify_here(self, tokens: np.ndarray, pos: int, stale: bool) -> np.ndarray:
        """Every window of a one-agent ring in turn; the logits of every token."""
        ring, seq = self.ring, self.slot.seq_id
        x: np.ndarray | None = tokens
        logits = None
        for r, w in enumerate(ring.windows):
            if stale:
                w.kv_remove(seq, pos)
            out = ring.meter.timed(r, len(tokens), w.forward_many, [(x, pos, seq)], [True])[0]
            x, logits = out.hidden, out.logits
        return self._logits(logits, pos)


@dataclass
class _Sent:
    """A trip sent ahead (:meth:`SpeculativeSession._send_ahead`): its tokens (the guessed last kept token, then
    its drafts), their first position, and its frames."""

    tokens: list[int]
    pos: int
    frames: list[Frame]


class Drafters:
    """The head's drafters: prompt lookup, and the ``--draft MODEL`` model (loaded once per plan shape).

    Args:
        default: the agent's ``--draft`` settings, for jobs that bring none.
        model: the agent's draft model file, or None (then a job's ``model_path`` is used when it exists).
        threads: CPU threads of the draft model.
    """

    def __init__(self, default: Speculative | None = None, model: Path | None = None, threads: int = 2) -> None:
        self.default, self.model, self.threads = default, model, threads
        self._loaded: tuple[tuple[str, int, int], ModelDrafter] | None = None
        self._lock = threading.Lock()  # sessions start on several worker threads
        self._choosers: dict[tuple[str, str], GammaChooser] = {}  # (plan, draft kind) → its γ chooser

    def settings(self, job: GenerateJob) -> Speculative | None:
        """The job's settings, completed by the agent's default; None: no speculation."""
        s = job.speculative
        if s is None or s.draft is None:
            base = self.default
            if base is None:
                return None
            s = base if s is None else s.model_copy(update={"draft": base.draft})
        return s if s.on else None

    def drafter(self, ring: Ring, s: Speculative) -> Drafter | None:
        """The drafter for ``s`` on ``ring``, acquired (the caller releases it): a new :class:`NgramDrafter`,
        or the draft model (None when there is none here, or it does not fit the target's vocabulary)."""
        if s.draft == "ngram":
            return NgramDrafter()
        path = self.model or (Path(s.model_path) if s.model_path and Path(s.model_path).is_file() else None)
        if path is None:
            log.warning("a draft model was asked for but none is here (agent --draft MODEL): decoding plainly")
            return None
        with self._lock:  # looked up and acquired at once: a plan change cannot close it in between
            model = self._model(ring, path)
            return model if model is not None and model.acquire() else None

    def _model(self, ring: Ring, path: Path) -> ModelDrafter | None:
        key = (str(path), ring.plan.n_ctx, ring.plan.n_parallel)
        if self._loaded is None or self._loaded[0] != key:
            why = vocabulary_mismatch(ring.windows[-1].path, path)
            if why:
                log.warning("%s: decoding plainly", why)
                return None
            self.close()
            self._loaded = (key, ModelDrafter(path, n_ctx=key[1], n_seq=key[2], n_threads=self.threads))
        return self._loaded[1]

    def session(self, ring: Ring, slot: Slot, job: GenerateJob, emit: Emit) -> Session:
        """A request's session: speculative when its settings (or the agent's default) ask for a draft."""
        if job.embed:
            return EmbedSession(ring, slot, job, emit)
        s = self.settings(job)
        drafter = self.drafter(ring, s) if s is not None else None
        if s is None or drafter is None:  # a drafter is released when its session ends
            return HeadSession(ring, slot, job, emit)
        with self._lock:
            key = (ring.plan.plan_id, drafter.kind)
            if key not in self._choosers:
                self._choosers = {k: v for k, v in self._choosers.items() if k[0] == key[0]}  # older plans' go
                self._choosers[key] = GammaChooser(
                    ring.plan.predicted_ms_per_token or 0.0, ahead=isinstance(drafter, ModelDrafter)
                )
            chooser = self._choosers[key]
        return SpeculativeSession(ring, slot, job, emit, drafter, s, chooser)

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded[1].close()
            self._loaded = None

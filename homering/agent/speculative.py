"""Speculative decoding on the head: draft γ tokens, verify them all in one trip around the ring.

A :class:`SpeculativeSession` is a :class:`~homering.agent.generation.HeadSession` whose trips carry the
last kept token plus γ draft tokens (:mod:`homering.engine.drafting`) as one FORWARD frame with
:data:`~homering.wire.FLAG_ROWS`: every window decodes the γ + 1 tokens as one batch at positions
n … n + γ, and the head's last window returns the logits of all of them. The head keeps the longest prefix
of drafts its own sampler agrees with plus one token (:func:`~homering.engine.drafting.verify_rows`); the
next trip starts with a KV_REMOVE frame in the same group, so every window drops the rejected positions
(``llama_memory_seq_rm`` from the first one) before it decodes. γ adapts (:class:`GammaChooser`).

Sources: Leviathan et al. 2023, "Fast inference from transformers via speculative decoding"; Chen et al.
2023, "Accelerating large language model decoding with speculative sampling"; prima.cpp's speculative ring.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from homering.agent.generation import Emit, HeadSession, Session
from homering.agent.ring import Ring
from homering.agent.slots import Slot
from homering.engine.drafting import Drafter, ModelDrafter, NgramDrafter, Speculative, verify_rows
from homering.engine.sampling import SamplerChain
from homering.errors import HomeringError
from homering.models.vocab import vocabulary_mismatch
from homering.wire import Frame, GenerateJob

log = logging.getLogger("homering.agent")

VERIFY_SHARE = 0.03
"""Prior cost of one more token in a trip's batch, as a share of the trip (the ring's hops dominate)."""
PROBE_COST = 0.02
"""With γ = 0 chosen, a one-token draft is tried now and then, at most this share of the time."""
DECAY = 0.9
"""Weight of the past in the acceptance and cost averages, per trip."""


class GammaChooser:
    """Chooses γ per trip: the draft length that maximises expected kept tokens per millisecond,

        E(γ) / (T + γ (c_v + c_d)),   E(γ) = (1 - α^(γ+1)) / (1 - α)

    (Leviathan et al. 2023, §3.4), with α the measured per-token acceptance rate, T the trip's time (the
    plan's predicted time per token until trips are measured), c_v a verified token's extra time and c_d a
    draft token's time (both measured). When γ = 0 wins, a one-token probe runs once in a while, so the
    loss against plain decoding stays within :data:`PROBE_COST` plus a probe's share.

    Args:
        s: the request's settings (``n_min`` … ``n_max``, ``adaptive``).
        trip_ms: the plan's predicted time of one trip (ms), or 0 when unknown.
    """

    def __init__(self, s: Speculative, trip_ms: float) -> None:
        self.s = s
        self.acc, self.rej = 2.0, 1.0  # decayed counts of accepted and rejected draft tokens (prior α ≈ 0.6)
        self.trip_ms = trip_ms or 0.0
        self.token_ms = VERIFY_SHARE * self.trip_ms
        self.draft_ms = 0.0
        self._since_probe = 0

    @property
    def alpha(self) -> float:
        return self.acc / (self.acc + self.rej)

    def choose(self, room: int) -> int:
        """γ for the next trip, at most ``room`` (what is left of max_tokens and the context)."""
        top = min(self.s.n_max, room)
        if top <= 0:
            return 0
        if not self.s.adaptive:
            return top
        a, t = min(self.alpha, 0.999), max(self.trip_ms, 1e-3)
        cost = self.token_ms + self.draft_ms
        best = max(range(min(self.s.n_min, top), top + 1), key=lambda g: (1 - a ** (g + 1)) / (1 - a) / (t + g * cost))
        if best > 0:
            self._since_probe = 0
            return best
        self._since_probe += 1
        if self._since_probe * PROBE_COST * t >= cost:  # a probe costs at most PROBE_COST of the time
            self._since_probe = 0
            return 1
        return 0

    def record(self, gamma: int, drafted: int, trip_ms: float, draft_ms: float, *, accepted: int) -> None:
        """A trip of ``drafted`` draft tokens (asked ``gamma``) kept ``accepted`` of them in ``trip_ms``."""
        if drafted:
            self.acc = DECAY * self.acc + accepted
            self.rej = DECAY * self.rej + (1 if accepted < drafted else 0)
            self.draft_ms = DECAY * self.draft_ms + (1 - DECAY) * draft_ms / drafted
        base = trip_ms - drafted * self.token_ms
        self.trip_ms = base if not self.trip_ms else DECAY * self.trip_ms + (1 - DECAY) * base
        if drafted and self.trip_ms:
            extra = max(0.0, (trip_ms - self.trip_ms) / drafted)
            self.token_ms = DECAY * self.token_ms + (1 - DECAY) * min(extra, self.trip_ms)


class SpeculativeSession(HeadSession):
    """A request's loop with speculative decoding (see the module's text); greedy and seeded answers are the
    same tokens as :class:`HeadSession`'s. ``drafted``/``accepted`` count its draft tokens."""

    def __init__(self, ring: Ring, slot: Slot, job: GenerateJob, emit: Emit, drafter: Drafter, s: Speculative):
        super().__init__(ring, slot, job, emit)
        self.drafter, self.s = drafter, s
        self.gamma = GammaChooser(s, ring.plan.predicted_ms_per_token or 0.0)
        self.drafted = self.accepted = self.trips = 0
        self._last: tuple[int, int, float, float] | None = None  # the last trip: γ, drafted, trip ms, draft ms

    def run(self):  # type: ignore[no-untyped-def]
        try:
            end = super().run()
        finally:
            self.drafter.forget(self.slot.seq_id)
        end.drafted, end.accepted, end.trips = self.drafted, self.accepted, self.trips
        return end

    def _generate(self, sampler: SamplerChain) -> None:
        """Prefill, then trips of the last kept token + γ drafts until the request ends (never past a stop
        string or max_tokens: the kept tokens are taken one by one and the loop ends at the first end)."""
        n_ctx, job = self.ring.plan.n_ctx, self.job
        if len(self.prompt) >= n_ctx:
            raise HomeringError(f"the prompt has {len(self.prompt)} tokens but the context holds {n_ctx}")
        max_new = min(job.sampling.max_tokens - len(self.resumed), n_ctx - len(self.prompt))
        self.t0 = time.perf_counter()
        if max_new > 0 and not self.stops.stopped:
            rows, pos, new = self._prefill()[None, :], len(self.prompt), 0
            drafts: list[int] = []
            while True:
                self._check_interrupted()
                kept, ended = self._keep(sampler, rows, drafts, max_new - new)
                new += kept
                if self._last is not None:  # what the last trip cost and how much of its draft was kept
                    self.gamma.record(*self._last, accepted=min(kept - 1, self._last[1]))
                if ended:
                    break
                hole = len(drafts) + 1 - kept  # rejected positions the KV caches still hold
                pos += kept
                rows, drafts = self._trip(pos - 1, hole, max_new - new)
        self.t_end = time.perf_counter()

    def _keep(self, sampler: SamplerChain, rows: np.ndarray, drafts: list[int], room: int) -> tuple[int, bool]:
        """Sample the verified rows; emit each kept token. (Tokens kept, whether the request ended.)"""
        kept = 0
        for tok in verify_rows(sampler, rows, drafts):
            event, end = self._take(tok)
            if event is not None:
                self.emit(event)
            kept += 1
            if end or kept >= room:
                self.accepted += max(0, kept - 1)
                return kept, True
        self.accepted += kept - 1
        return kept, False

    def _trip(self, pos: int, hole: int, room: int) -> tuple[np.ndarray, list[int]]:
        """Draft and send the last kept token (at ``pos``) + γ drafts; their logits ((γ + 1, n_vocab)).

        The ``hole`` rejected positions are dropped first, and the trip refills at least as many cells: the
        draft is padded (with its last token) to ``hole - 1`` tokens. A hole left in llama.cpp's unified KV
        cache would take another sequence's next tokens, placed before that sequence's latest cells, and
        its logits then change (measured: up to 0.8 on SmolLM2), so answers would drift."""
        room = min(room - 1, self.ring.plan.n_ctx - pos - 1, self.ring.plan.n_batch - 1)
        gamma = self.gamma.choose(room)
        t0 = time.perf_counter()
        history = list(self.job.prompt_token_ids) + self.tokens
        drafts = self.drafter.draft(self.slot.seq_id, history, gamma)[:gamma] if gamma else []
        drafts += [(drafts or self.tokens)[-1]] * (hole - 1 - len(drafts))
        t1 = time.perf_counter()
        tokens = np.asarray([self.tokens[-1], *drafts], dtype=np.int32)
        rows = np.atleast_2d(self._verify(tokens, pos, hole > 0))
        t2 = time.perf_counter()
        self.drafted += len(drafts)
        self.trips += 1
        self._last = (gamma, len(drafts), (t2 - t1) * 1000, (t1 - t0) * 1000)
        return rows, drafts

    def _verify(self, tokens: np.ndarray, pos: int, stale: bool) -> np.ndarray:
        """Run ``tokens`` at ``pos`` … through every window (after dropping positions >= ``pos`` when
        ``stale``); the logits of every token."""
        ring, seq = self.ring, self.slot.seq_id
        if len(ring.plan.ring) == 1:
            x: np.ndarray | None = tokens
            logits = None
            for r, w in enumerate(ring.windows):
                if stale:
                    w.kv_remove(seq, pos)
                out = ring.meter.timed(r, len(tokens), w.forward_many, [(x, pos, seq)], [True])[0]
                x, logits = out.hidden, out.logits
            return self._logits(logits, pos)
        frames = [Frame.kv_remove(self.slot.number, seq, pos)] if stale else []
        frames.append(Frame.forward(self.slot.number, seq, pos, tokens, rows=True))
        return self._logits(self._through_ring(frames), pos)


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
        """The drafter for ``s`` on ``ring``: a new :class:`NgramDrafter`, or the draft model (None when
        there is none here, or it does not fit the target's vocabulary)."""
        if s.draft == "ngram":
            return NgramDrafter()
        path = self.model or (Path(s.model_path) if s.model_path and Path(s.model_path).is_file() else None)
        if path is None:
            log.warning("a draft model was asked for but none is here (agent --draft MODEL): decoding plainly")
            return None
        with self._lock:
            return self._model(ring, path)

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
        s = self.settings(job)
        drafter = self.drafter(ring, s) if s is not None else None
        if s is None or drafter is None:
            return HeadSession(ring, slot, job, emit)
        return SpeculativeSession(ring, slot, job, emit, drafter, s)

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded[1].close()
            self._loaded = None

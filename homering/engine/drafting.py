"""Speculative decoding's drafters and acceptance rules (the head's side; no cluster state).

A drafter proposes up to γ tokens that follow a sequence; the target model (the ring) then checks them all
in one trip (:mod:`homering.agent.speculative`). Two drafters:

- :class:`NgramDrafter`: prompt-lookup decoding (Saxena 2023; llama.cpp's ``ngram`` speculative modes):
  the tokens that followed the latest earlier occurrence of the sequence's last n tokens. No model.
- :class:`ModelDrafter`: a small model with the target's vocabulary, whole on the head, with its own KV
  cache (one sequence per request), drafting greedily.

Both drafts are deterministic (q is one-hot). For a deterministic draft token x the speculative-sampling
rule of Leviathan et al. 2023 / Chen et al. 2023 (accept x with probability min(1, p(x)/q(x)) = p(x), else
sample from norm(max(0, p - q)) = p without x) is the same as: sample y from p; keep y; the draft survives
iff y = x. :func:`verify_rows` does exactly that with the request's own sampler chain, so it draws one
random number per kept token, like decoding without speculation: seeded answers are the same tokens with or
without a draft, and greedy answers are the target's. :func:`accept_stochastic` is the general rule for a
draft with a full distribution q.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from homering.engine.batches import EXACT_BATCH
from homering.engine.sampling import SamplerChain
from homering.engine.window import LayerWindow
from homering.gate import Gate

log = logging.getLogger("homering.engine")

GAMMA_MAX = EXACT_BATCH - 1
"""The most draft tokens one trip verifies (γ); a trip carries γ + 1 tokens (at most :data:`EXACT_BATCH`)."""
AHEAD_NICE = 19
"""The nice value of a draft model's draft-ahead thread (:meth:`ModelDrafter.draft_ahead`)."""
NGRAM_MIN = 2
"""The shortest repeat :class:`NgramDrafter` drafts from: a single repeated token predicts the next one badly
(measured on the speculative bench's edit/summary/JSON prompts with SmolLM2: the first drafted token was kept
after 22% of 1-gram matches, after 55%, 36% and 77% of 2-, 3- and 4-gram ones), and a draft that is not kept
costs its verification."""
NGRAM_CONTEXT = 32
"""The longest match :class:`NgramDrafter` measures (tokens of context that agree before the draft)."""
NGRAM_CANDIDATES = 64
"""The latest this many occurrences of the last :data:`NGRAM_MIN` tokens are compared (the lookup's cost)."""


class Speculative(BaseModel):
    """Speculative-decoding settings of a request (llama-server's ``speculative.*``).

    ``draft``: ``ngram`` (prompt lookup), ``model`` (the head's draft model, ``--draft MODEL``), ``off``;
    None: the cluster's default. ``n_max``/``n_min``: the range of γ, draft tokens per trip; ``adaptive``:
    γ follows the measured acceptance rate within that range (else γ = ``n_max``).
    """

    model_config = ConfigDict(extra="forbid")

    draft: Literal["off", "ngram", "model"] | None = None
    n_max: int = Field(ge=1, le=GAMMA_MAX, default=GAMMA_MAX, description="at most this many draft tokens per trip (γ)")
    n_min: int = Field(ge=0, le=GAMMA_MAX, default=0, description="at least this many when a draft has them")
    adaptive: bool = True
    model_path: str | None = Field(
        default=None, description="the controller's draft model file (set by the controller, not by clients)"
    )

    @property
    def on(self) -> bool:
        return self.draft in ("ngram", "model")


def with_default(s: Speculative | None, default: Speculative | None) -> Speculative | None:
    """A request's settings completed by the cluster's ``default`` (its ``--draft``): the default's draft
    when the request names none, and always the default's draft model file."""
    if default is None:
        return s
    if s is None:
        return default
    update: dict[str, object] = {"model_path": default.model_path}
    if s.draft is None:
        update["draft"] = default.draft
    return s.model_copy(update=update)


class NgramDrafter:
    """Prompt-lookup drafting: among the earlier occurrences of the sequence's last :data:`NGRAM_MIN` tokens,
    take the one whose preceding tokens agree longest with the sequence's (the longest suffix match, up to
    :data:`NGRAM_CONTEXT`; ties: the one with more tokens after it, then the latest) and propose the tokens
    that followed it. Cost: O(candidates ×
    match length) per lookup, no model.

    The match length ``m`` also says how far to trust it (:meth:`lookup`): the session drafts at most
    ``m - 1`` tokens. On the speculative bench's prompts, SmolLM2 with γ = m - 1 was 1.43× plain decoding in
    a replay of one run's answers against 1.34× for the latest 2-4-gram with a γ chosen from the acceptance
    rate: a long match is a copy under way, a short one a common phrase.

    Sources: Saxena, "Prompt lookup decoding" (2023); llama.cpp's ``--spec-type ngram-simple``; the match
    length setting the draft length as in SuffixDecoding (Oliaro et al. 2024).
    """

    kind = "ngram"

    def catch_up_ms(self, seq_id: int) -> float:
        """0: no model, nothing to bring up to the history."""
        return 0.0

    def lookup(self, history: list[int], gamma: int) -> tuple[int, list[int]]:
        """``(m, tokens)``: the longest suffix match's length ``m`` (0: none, else ``NGRAM_MIN`` … ``NGRAM_CONTEXT``)
        and up to ``gamma`` tokens that followed it (token ids)."""
        n_hist = len(history)
        if gamma <= 0 or n_hist <= NGRAM_MIN:
            return 0, []
        arr = np.asarray(history, dtype=np.int64)
        n = NGRAM_MIN
        end = n_hist - n  # an occurrence starts before the tail and has a token after it
        hits = np.ones(end, dtype=bool)
        for j in range(n):
            hits &= arr[j : end + j] == arr[end + j]
        best: tuple[int, int] = (0, 0)  # (match length, tokens that follow, up to gamma) of the best so far
        best_s = -1
        for s in np.flatnonzero(hits)[::-1][:NGRAM_CANDIDATES]:
            s, m = int(s), n
            while m < NGRAM_CONTEXT and s + n - m - 1 >= 0 and arr[s + n - m - 1] == arr[n_hist - m - 1]:
                m += 1
            score = (m, min(gamma, n_hist - s - n))
            if score > best:
                best, best_s = score, s
        if best_s < 0:
            return 0, []
        return best[0], [int(t) for t in history[best_s + n : best_s + n + gamma]]

    def draft(self, seq_id: int, history: list[int], gamma: int) -> list[int]:
        """Up to ``gamma`` tokens to follow ``history`` (token ids); [] when its last tokens do not repeat."""
        return self.lookup(history, gamma)[1]

    def propose(self, history: list[int], room: int, s: Speculative) -> list[int]:
        """A trip's drafts after ``history``: the lookup's tokens, as many as :func:`lookup_gamma` trusts for
        its match and the request's settings ``s``, at most ``room``."""
        m, found = self.lookup(history, room)
        return found[: lookup_gamma(s, m, len(found))]

    def draft_ahead(self, seq_id: int, history: list[int], n: int) -> None:
        """Nothing to do ahead: a lookup costs microseconds."""

    def forget(self, seq_id: int) -> None:
        """Nothing is kept per sequence."""

    def acquire(self) -> bool:
        """Nothing to hold: always usable."""
        return True

    def release(self) -> None:
        """Nothing to free."""

    def close(self) -> None:
        """Nothing to free."""


def lookup_gamma(s: Speculative, m: int, found: int) -> int:
    """γ for a prompt lookup that matched ``m`` tokens of context and found ``found`` tokens after them: at
    most ``m - 1`` (:class:`NgramDrafter`), within the request's ``n_min`` …
    ``n_max`` (``n_max`` when not adaptive), never more than were found; 0 without a match."""
    if found <= 0:
        return 0
    if not s.adaptive:
        return min(s.n_max, found)
    return min(found, s.n_max, max(s.n_min, m - 1, 1))


class ModelDrafter:
    """A small draft model, whole on the head, with its own KV cache of ``n_seq`` sequences.

    Each :meth:`draft` first brings the draft's sequence up to ``history`` (it drops the positions where its
    cache differs, the rejected drafts, and decodes the tokens it lacks), then decodes γ greedy tokens one
    at a time. Its vocabulary must be the target's (:func:`homering.models.vocab.vocabulary_mismatch`).

    Args:
        path: the draft GGUF.
        n_ctx: tokens per sequence (the plan's context).
        n_seq: sequences (the plan's ``n_parallel``).
        n_threads: CPU threads for its decode.

    Raises:
        HomeringError: llama.cpp cannot load the file.
    """

    kind = "model"

    def __init__(self, path: str | Path, *, n_ctx: int, n_seq: int, n_threads: int = 2) -> None:
        self.path = Path(path)
        self.window = LayerWindow(
            path, takes_tokens=True, gives_logits=True, n_ctx=n_ctx, n_batch=256, n_threads=n_threads, n_seq_max=n_seq
        )
        self._cached: dict[int, list[int]] = {}  # the tokens in each sequence's draft KV cache
        self._catch_up: dict[int, float] = {}  # each sequence's last catch-up, ms
        self._ahead: dict[int, tuple[list[int], Future[list[int]]]] = {}  # seq → (assumed history, its draft)
        self.ahead_kept = self.ahead_lost = 0  # drafts ahead that were the next draft, and that were not
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="draft-ahead", initializer=_yield_to_the_ring)
        self._lock = threading.Lock()
        self._gate = Gate()  # the sessions using it: close() frees the model when the last one releases it

    def catch_up_ms(self, seq_id: int) -> float:
        """The last :meth:`draft` of ``seq_id``'s time bringing its draft sequence up to the history, beyond one
        token, ms (0 when it lacked one token, or never drafted). Kept per sequence: two requests drafting
        at once on the head each read their own."""
        with self._lock:
            return self._catch_up.get(seq_id, 0.0)

    def draft(self, seq_id: int, history: list[int], gamma: int) -> list[int]:
        """Up to ``gamma`` greedy draft tokens to follow ``history``; fewer near the end of the context.

        When a :meth:`draft_ahead` of ``seq_id`` guessed right (``history`` is what it assumed plus its first
        token), its further tokens are the draft, as far as they go: a greedy draft of ``h + [g0]`` is the
        rest of the greedy draft ``g0, g1, …`` of ``h``. Otherwise the draft starts from where its cache and
        ``history`` part."""
        ahead = self._settle(seq_id)
        if ahead is not None:
            assumed, toks = ahead
            n = len(assumed)
            if toks and len(history) == n + 1 and history[n] == toks[0] and history[:n] == assumed:
                ready = toks[1 : 1 + gamma]
                with self._lock:
                    self._catch_up[seq_id] = 0.0
                    self.ahead_kept += 1
                if len(ready) >= gamma:
                    return ready
                return ready + self._draft(seq_id, history + ready, gamma - len(ready))
            with self._lock:
                self.ahead_lost += 1
        return self._draft(seq_id, history, gamma)

    def draft_ahead(self, seq_id: int, history: list[int], n: int) -> None:
        """Start drafting ``n`` tokens to follow ``history`` on a thread of the drafter's own, while the trip
        that verifies ``history``'s drafts is in flight; the next :meth:`draft` of ``seq_id`` waits for it.

        If the trip keeps every draft and its one extra token is this draft's first (probability about
        α^(γ+1)), the next trip's draft is ready: drafting overlaps the ring's hops and the other devices'
        compute instead of adding to them. A wrong guess costs the head CPU time during the trip, and the
        next draft drops its cache back to where it parts from the history (as after a rejection). The idea
        is the asynchronous drafting of pipelined speculative decoding (e.g. PipeSpec, McDanel et al. 2025)."""
        if n <= 0:
            return
        self._settle(seq_id)
        future = self._pool.submit(self._draft, seq_id, list(history), n)
        with self._lock:
            self._ahead[seq_id] = (list(history), future)

    def _settle(self, seq_id: int) -> tuple[list[int], list[int]] | None:
        """Wait for ``seq_id``'s draft ahead, if any: (the history it assumed, its tokens), or None (none, or
        it failed: a draft that follows starts over from the cache and says what is wrong)."""
        with self._lock:
            entry = self._ahead.pop(seq_id, None)
        if entry is None:
            return None
        try:
            return entry[0], entry[1].result()
        except Exception as e:  # noqa: BLE001 - the drafting that follows meets it again, on the caller's thread
            log.debug("a draft ahead failed: %s", e)
            return None

    def _draft(self, seq_id: int, history: list[int], gamma: int) -> list[int]:
        gamma = min(gamma, self.window.n_ctx - len(history))
        if gamma <= 0:
            return []
        with self._lock:
            cached = self._cached.get(seq_id, [])
        same = _common_prefix(cached, history)
        same = min(same, len(history) - 1)  # the last token is decoded again: its logits are wanted
        self.window.kv_remove(seq_id, same)
        t0 = time.perf_counter()
        logits = self.window.forward(np.asarray(history[same:], dtype=np.int32), same, seq_id).logits
        catch_up = (time.perf_counter() - t0) * 1000 if len(history) - same > 1 else 0.0
        out: list[int] = []
        pos = len(history)
        while logits is not None:
            out.append(int(np.argmax(logits)))
            if len(out) == gamma:
                break
            logits = self.window.forward(np.asarray(out[-1:], dtype=np.int32), pos, seq_id).logits
            pos += 1
        with self._lock:
            self._cached[seq_id] = list(history) + out[:-1]
            self._catch_up[seq_id] = catch_up
        return out

    def forget(self, seq_id: int) -> None:
        """A request ended: its draft sequence starts over next time."""
        self._settle(seq_id)
        with self._lock:
            self._cached.pop(seq_id, None)
            self._catch_up.pop(seq_id, None)
        self.window.kv_remove(seq_id, 0)

    def acquire(self) -> bool:
        """A session starts using the draft model; False once it is closing (take another)."""
        return self._gate.enter()

    def release(self) -> None:
        """A session is done with it: the model is freed now if :meth:`close` was called meanwhile."""
        self._gate.exit()

    def close(self) -> None:
        """Free the model, or, while sessions use it (a plan changed under a request), once the last releases
        it (:class:`~homering.gate.Gate`)."""
        self._gate.close(then=self._free)

    def _free(self) -> None:
        self._pool.shutdown(wait=True)  # a draft ahead still running uses the window
        self.window.close()


Drafter = NgramDrafter | ModelDrafter


def _yield_to_the_ring() -> None:
    """Run this thread (the draft ahead) at the lowest priority: while the trip it overlaps computes the head's
    own window, that window goes first (the trip waits for it; the draft is wanted only when the trip is back).
    Linux sets a thread's nice value by its id; elsewhere, or without the right, the thread keeps its own."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), AHEAD_NICE)
    except (AttributeError, OSError) as e:
        log.debug("the draft-ahead thread keeps its priority: %s", e)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def verify_rows(sampler: SamplerChain, rows: npt.NDArray[np.float32], drafts: list[int]) -> Iterator[int]:
    """The tokens a verification keeps: sample row 0 with the request's chain; while the sample equals the
    draft token of that row, go on to the next row. Yields every kept token (the accepted drafts and one
    more); the caller may stop early (a stop string, max_tokens), so no row after that is sampled.

    Args:
        sampler: the request's chain (it accepts each yielded token into its history).
        rows: (len(drafts) + 1, n_vocab) float32 logits: row i follows the trip's first i + 1 tokens.
        drafts: the γ draft tokens the trip carried after its first token.
    """
    for i in range(len(drafts) + 1):
        tok = sampler.sample(rows[i])
        yield tok
        if i == len(drafts) or tok != drafts[i]:
            return


def accept_stochastic(
    p: npt.NDArray[np.float64], q: npt.NDArray[np.float64], drafts: list[int], rng: np.random.Generator
) -> list[int]:
    """The speculative-sampling rule for a draft with a full distribution (Leviathan et al. 2023, alg. 1;
    Chen et al. 2023): accept draft ``x_i`` with probability min(1, p_i(x)/q_i(x)); at the first rejection
    sample from norm(max(0, p_i - q_i)); after γ acceptances sample from p_γ. The kept tokens are
    distributed as the target's own samples.

    Args:
        p: (γ + 1, n_vocab) target probabilities (after the sampler's filters and temperature).
        q: (γ, n_vocab) draft probabilities the drafts were sampled from.
        drafts: the γ draft tokens.
        rng: the request's random stream.

    Returns:
        the kept tokens: the accepted drafts and one more (1 … γ + 1 tokens).
    """
    out: list[int] = []
    for i, x in enumerate(drafts):
        if rng.random() * q[i, x] < p[i, x]:
            out.append(int(x))
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        probs = residual / total if total > 0 else p[i]
        out.append(int(rng.choice(probs.shape[0], p=probs)))
        return out
    out.append(int(rng.choice(p.shape[1], p=p[len(drafts)] / p[len(drafts)].sum())))
    return out

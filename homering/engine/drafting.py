"""Speculative decoding's drafters and acceptance rules (the head's side; no cluster state).

A drafter proposes up to γ tokens that follow a sequence; the target model (the ring) then checks them all
in one trip (:mod:`homering.agent.speculative`). Two drafters:

- :class:`NgramDrafter`: prompt-lookup decoding (Saxena 2023; llama.cpp's ``ngram`` speculative modes):
  the tokens that followed the latest earlier occurrence of the sequence's last n tokens. No model.
- :class:`~homering.engine.draft_model.ModelDrafter`: a small model with the target's vocabulary, whole on
  the head, with its own KV cache (one sequence per request), drafting greedily.

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
from collections.abc import Iterator
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from homering.engine.batches import EXACT_BATCH
from homering.engine.draft_model import ModelDrafter
from homering.engine.sampling import SamplerChain

log = logging.getLogger("homering.engine")

GAMMA_MAX = EXACT_BATCH - 1
"""The most draft tokens one trip verifies (γ); a trip carries γ + 1 tokens (at most :data:`EXACT_BATCH`)."""
NGRAM_MIN = 2
"""The shortest repeat :class:`NgramDrafter` drafts from, but for a rare token (:data:`NGRAM_RARE`): a single
repeated token predicts the next one badly (measured on the speculative bench's edit/summary/JSON prompts with
SmolLM2: the first drafted token was kept after 22% of 1-gram matches, after 55%, 36% and 77% of 2-, 3- and
4-gram ones), and a draft that is not kept costs its verification."""
NGRAM_RARE = 2
"""Without a repeat of :data:`NGRAM_MIN` tokens, a last token seen at most this many times before drafts the
token after its latest occurrence: names, numbers and word pieces repeat with what follows them (measured on
three sets of SmolLM2's answers to the bench's n-gram prompts, where no 2-token repeat was found: kept after
52-57% of such drafts, as often as after a 2-gram match; a replay of one run's answers: 1.44× → 1.50×)."""
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
        """``(m, tokens)``: the longest suffix match's length ``m`` (0: none, 1: a rare last token,
        :data:`NGRAM_RARE`, else ``NGRAM_MIN`` … ``NGRAM_CONTEXT``) and up to ``gamma`` tokens that followed it
        (token ids)."""
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
            seen = np.flatnonzero(arr[:-1] == arr[-1])
            if not 0 < seen.size <= NGRAM_RARE:
                return 0, []
            return 1, [int(t) for t in history[int(seen[-1]) + 1 : int(seen[-1]) + 1 + gamma]]
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


Drafter = NgramDrafter | ModelDrafter


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

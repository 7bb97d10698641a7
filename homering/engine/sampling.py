"""Sampling on the head: llama.cpp's sampler chain over a logits vector, and stop strings."""

from __future__ import annotations

import ctypes
import random

import llama_cpp
import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from homering.engine.grammar import allows as grammar_allows

# llama.cpp's struct llama_token_data {llama_token id; float logit; float p;}
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
PENALTY_LAST_N = 64  # tokens the presence/frequency penalties look back on (llama.cpp's default)


class Sampling(BaseModel):
    """Sampling settings; temperature <= 0 means greedy.

    The defaults are llama.cpp's (llama-server's and ``llama-cli``'s): temperature
    0.8, top_k 40, top_p 0.95, min_p 0.05. Every API fills in these when a client
    sends no value, so small models do not ramble on a flat distribution.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_tokens: int = Field(ge=1, le=1 << 20, default=256)
    temperature: float = Field(ge=0.0, le=10.0, default=0.8)
    top_k: int = Field(ge=0, default=40)
    top_p: float = Field(gt=0.0, le=1.0, default=0.95)
    min_p: float = Field(
        ge=0.0,
        le=1.0,
        default=0.05,
        description="drop tokens whose probability is below min_p times the most likely one's",
    )
    seed: int | None = Field(ge=0, le=2**32 - 1, default=None)
    presence_penalty: float = Field(
        ge=-2.0, le=2.0, default=0.0, description="OpenAI's: subtracted once from every token already generated"
    )
    frequency_penalty: float = Field(
        ge=-2.0, le=2.0, default=0.0, description="OpenAI's: subtracted per occurrence of a generated token"
    )
    stop: list[str] = Field(
        default_factory=list,
        max_length=4,
        description="end the answer before the first of these strings (not included)",
    )
    ignore_eos: bool = Field(
        default=False, description="generate max_tokens even past end-of-generation tokens (benchmarks)"
    )


class SamplerChain:
    """A ``llama_sampler`` chain built from :class:`Sampling` settings, applied to a logits vector.

    The order is llama.cpp's common sampler's: penalties (presence and
    frequency, OpenAI's additive form, over the last :data:`PENALTY_LAST_N`
    generated tokens) → greedy when ``temperature <= 0``, otherwise top-k →
    top-p → min-p → temperature → a seeded random draw. Same seed and settings
    give the same tokens.

    It samples from a copy of the logits (``(n_vocab,)`` float32), not from a
    llama context: the head runs several sequences through the same last
    window, and each request's logits travel with its frame.

    With a ``grammar`` (a grammar sampler, :func:`homering.engine.grammar.grammar_sampler`; the chain owns
    and frees it) the sampled token must be one the grammar allows: the chain's pick is checked alone, and
    only when the grammar rejects it is the chain applied again to the logits the grammar filtered
    (llama.cpp's ``common_sampler_sample``).

    Args:
        s: the request's sampling settings.
        n_vocab: the model's vocabulary size (llama.cpp's penalties sampler takes it
            in the llama.cpp that llama-cpp-python 0.3.36 vendors).
        grammar: a grammar sampler, or None (unconstrained).
    """

    def __init__(self, s: Sampling, n_vocab: int, *, grammar: llama_cpp.llama_sampler_p | None = None) -> None:
        self._grammar = grammar
        params = llama_cpp.llama_sampler_chain_default_params()
        self._chain: llama_cpp.llama_sampler_p | None = llama_cpp.llama_sampler_chain_init(params)

        def add(smpl: llama_cpp.llama_sampler_p) -> None:
            llama_cpp.llama_sampler_chain_add(self._chain, smpl)

        if s.presence_penalty or s.frequency_penalty:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab, PENALTY_LAST_N, 1.0, s.frequency_penalty, s.presence_penalty
                )
            )
        if s.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            if s.min_p > 0.0:
                add(llama_cpp.llama_sampler_init_min_p(s.min_p, 1))
            add(llama_cpp.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed is not None else random.getrandbits(32)
            add(llama_cpp.llama_sampler_init_dist(seed))
        self._cells: npt.NDArray[np.void] | None = None
        self._ids = np.zeros(0, dtype=np.int32)

    def sample(self, logits: npt.NDArray[np.float32]) -> int:
        """Sample a token id from ``logits`` ((n_vocab,) float32) and accept it into the chain's history.

        Raises:
            RuntimeError: no token is left (a grammar that allows no token of this vocabulary).
        """
        token = self._apply(logits, constrained=False)
        if self._grammar is not None:
            if not grammar_allows(self._grammar, token, float(logits[token])):
                token = self._apply(logits, constrained=True)
            llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _apply(self, logits: npt.NDArray[np.float32], *, constrained: bool) -> int:
        """The chain's pick from ``logits`` (``constrained``: filtered through the grammar first)."""
        n = logits.shape[0]
        if self._cells is None or self._cells.shape[0] != n:
            self._cells = np.empty(n, dtype=_TOKEN_DATA)
            self._ids = np.arange(n, dtype=np.int32)
        cells = self._cells
        cells["id"] = self._ids  # samplers sort the cells in place: reset every time
        cells["logit"] = logits
        cells["p"] = 0.0
        arr = llama_cpp.llama_token_data_array(
            data=ctypes.cast(cells.ctypes.data, llama_cpp.llama_token_data_p), size=n, selected=-1, sorted=False
        )
        if constrained:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        llama_cpp.llama_sampler_apply(self._chain, ctypes.byref(arr))
        if not 0 <= arr.selected < arr.size:
            raise RuntimeError("the sampler chain selected no token")
        if constrained and arr.data[arr.selected].logit == float("-inf"):
            raise RuntimeError("the grammar allows no token here")
        return int(arr.data[arr.selected].id)

    def accept(self, tokens: list[int]) -> None:
        """Add tokens chosen earlier to the chain's history (penalties), as when a request resumes.

        The random state of a seeded chain is not restored: a resumed request
        with temperature > 0 goes on from a fresh draw of the same seed.
        """
        for t in tokens:
            if self._grammar is not None:
                llama_cpp.llama_sampler_accept(self._grammar, int(t))
            llama_cpp.llama_sampler_accept(self._chain, int(t))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None

    def __del__(self) -> None:  # pragma: no cover
        self.close()


class StopMatcher:
    """Cuts a stream of text deltas at the first of several stop strings (OpenAI's ``stop``).

    :meth:`feed` returns the text that is safe to emit: it holds back the
    longest tail that could still grow into a stop string, so a streamed
    answer never shows part of one.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add ``delta``; return what may be emitted now (``stopped`` is set when a stop string appeared)."""
        if self.stopped:
            return ""
        text = self._pending + delta
        if not self.stops:
            return text
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return text[:cut]
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The held-back text at the end of the stream."""
        out, self._pending = self._pending, ""
        return out

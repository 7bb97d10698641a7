"""llama.cpp's sampler chain for the head (temperature, top-k, top-p, seed)."""

from __future__ import annotations

import random

import llama_cpp

from homering.cluster.schema import Sampling


class SamplerChain:
    """A ``llama_sampler`` chain built from :class:`Sampling` settings.

    Greedy (argmax) when ``temperature <= 0``; otherwise top-k → top-p →
    temperature → a seeded random draw, as llama.cpp's common sampler. Same
    seed and settings give the same tokens.
    """

    def __init__(self, s: Sampling):
        params = llama_cpp.llama_sampler_chain_default_params()
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        add = lambda smpl: llama_cpp.llama_sampler_chain_add(self._chain, smpl)  # noqa: E731
        if s.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if s.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(s.top_k))
            if s.top_p < 1.0:
                add(llama_cpp.llama_sampler_init_top_p(s.top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(s.temperature))
            seed = s.seed if s.seed is not None else random.getrandbits(32)
            add(llama_cpp.llama_sampler_init_dist(seed))

    def sample(self, ctx) -> int:
        """Sample from the logits of the last output of ``ctx`` and accept the token."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, -1))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None

    def __del__(self):  # pragma: no cover
        self.close()

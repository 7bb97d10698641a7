"""Sampling on the head: llama.cpp's sampler chain (real llama_cpp samplers) and the APIs' defaults."""

from __future__ import annotations

import numpy as np

from homering.api.openai import ChatCompletionBody as ChatBody
from homering.engine.sampling import Sampling
from homering.engine.sampling import SamplerChain

N_VOCAB = 100


def _two_favourites() -> np.ndarray:
    """Tokens 0 and 1 at logit 5, the other 98 at 0: each of those holds e^-5 (0.7%) of a favourite's probability."""
    logits = np.zeros(N_VOCAB, dtype=np.float32)
    logits[:2] = 5.0
    return logits


def _draws(sampling: Sampling, seeds: range) -> set[int]:
    out = set()
    for seed in seeds:
        chain = SamplerChain(sampling.model_copy(update={"seed": seed}), N_VOCAB)
        try:
            out.add(chain.sample(_two_favourites()))
        finally:
            chain.close()
    return out


def test_a_request_without_sampling_fields_gets_llama_cpps_defaults():
    body = ChatBody.model_validate({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]})
    s = body.sampling(256)
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.8, 40, 0.95, 0.05)
    assert s == Sampling(max_tokens=256)  # one place holds the defaults
    nulls = ChatBody.model_validate({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                                     "temperature": None, "top_p": None})
    assert nulls.sampling(256) == s
    chosen = ChatBody.model_validate({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                                      "temperature": 0, "top_k": 0, "top_p": 1, "min_p": 0}).sampling(9)
    assert (chosen.temperature, chosen.top_k, chosen.top_p, chosen.min_p, chosen.max_tokens) == (0, 0, 1, 0, 9)


def test_min_p_drops_the_long_tail():
    """With the default min_p (0.05) only the two favourites are ever drawn; without it the tail shows up."""
    with_min_p = _draws(Sampling(), range(200))
    without = _draws(Sampling(min_p=0.0), range(200))
    assert with_min_p == {0, 1}
    assert without - {0, 1}, "the tail (98 tokens, ~25% of the mass after top-k/top-p) was never drawn"


def test_presence_penalty_changes_the_greedy_choice():
    """OpenAI's presence penalty, through llama.cpp's penalties sampler (its 0.3.36 signature takes n_vocab)."""
    logits = np.zeros(N_VOCAB, dtype=np.float32)
    logits[0], logits[1] = 1.0, 0.5
    plain = SamplerChain(Sampling(temperature=0), N_VOCAB)
    penalised = SamplerChain(Sampling(temperature=0, presence_penalty=1.0), N_VOCAB)
    try:
        assert [plain.sample(logits) for _ in range(2)] == [0, 0]
        assert [penalised.sample(logits) for _ in range(2)] == [0, 1]  # 0 is down to 0.0 after it appeared
    finally:
        plain.close()
        penalised.close()

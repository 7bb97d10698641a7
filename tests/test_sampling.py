"""Sampling on the head: llama.cpp's sampler chain (real llama_cpp samplers) and the APIs' defaults."""

from __future__ import annotations

import numpy as np
import pytest

from homering.api.openai import ChatCompletionBody as ChatBody
from homering.engine.sampling import SamplerChain, Sampling
from homering.engine.window import LayerWindow

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
    nulls = ChatBody.model_validate(
        {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "temperature": None, "top_p": None}
    )
    assert nulls.sampling(256) == s
    chosen = ChatBody.model_validate(
        {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Hi"}],
            "temperature": 0,
            "top_k": 0,
            "top_p": 1,
            "min_p": 0,
        }
    ).sampling(9)
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


def test_a_window_samples_from_its_last_forwards_logits(smollm2):
    """``LayerWindow.sample`` hands the chain the logits of the last forward (it passed the llama.cpp context)."""
    with LayerWindow(smollm2, takes_tokens=True, gives_logits=True, n_ctx=64, n_seq_max=2) as window:
        greedy = SamplerChain(Sampling(temperature=0), window.n_vocab)
        try:
            first, second = window.forward_many([(np.array([1, 2, 3]), 0, 0), (np.array([4, 5]), 0, 1)])
            assert window.sample(greedy) == int(np.argmax(second.logits))  # the last item of the batch
            out = window.forward(np.array([6, 7, 8, 9]), 3, 0)
            assert window.sample(greedy) == int(np.argmax(out.logits))
        finally:
            greedy.close()


def test_a_window_without_logits_cannot_sample(smollm2):
    with LayerWindow(smollm2, takes_tokens=True, gives_logits=True, n_ctx=64) as window:
        greedy = SamplerChain(Sampling(temperature=0), window.n_vocab)
        try:
            with pytest.raises(ValueError, match="no logits"):
                window.sample(greedy)  # nothing decoded yet
        finally:
            greedy.close()

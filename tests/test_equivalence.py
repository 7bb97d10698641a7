"""A chain of layer windows gives the unsplit model's greedy tokens and logits."""

from __future__ import annotations

import numpy as np
import pytest

from homering.engine.window import LayerWindow
from homering.models.slicing import Role, WindowSpec, slice_window

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    "]
N_NEW = 64


def chain_greedy(model_path, cuts, prompt_ids, n_new):
    windows = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        role = Role.for_range(a, b, cuts[-1])
        path = slice_window(model_path, WindowSpec(a, b, role), progress=False)
        windows.append(
            LayerWindow(path, takes_tokens=role.takes_tokens, gives_logits=role.gives_logits, n_ctx=512, n_threads=2)
        )
    try:

        def step(x, pos):
            for w in windows:
                out = w.forward(x, pos)
                x = out.hidden
            return out.logits

        first = logits = step(np.array(prompt_ids, dtype=np.int32), 0)
        tokens, pos = [], len(prompt_ids)
        for _ in range(n_new):
            tok = int(np.argmax(logits))
            tokens.append(tok)
            logits = step(np.array([tok], dtype=np.int32), pos)
            pos += 1
        return tokens, first
    finally:
        for w in windows:
            w.close()


SPLITS = [
    ("smollm2", [0, 10, 20, 30]),
    ("smollm2", [0, 1, 29, 30]),
    ("smollm2", [0, 7, 30]),
    ("gemma", [0, 7, 18]),
    ("gemma", [0, 5, 11, 18]),
    ("gemma", [0, 5, 6, 11, 12, 17, 18]),
]  # windows of one global-attention layer (5, 11, 17) only


@pytest.mark.parametrize("model,cuts", SPLITS, ids=[f"{m}-{c}" for m, c in SPLITS])
def test_chain_matches_unsplit(request, model, cuts):
    """64 greedy tokens identical to the unsplit model; last-position logits within 1e-4."""
    path, ref = request.getfixturevalue(model), request.getfixturevalue(f"{model}_ref")
    for prompt in PROMPTS:
        ids = ref.tokenize(prompt)
        ref_tokens, ref_logits = ref.greedy(ids, N_NEW)
        tokens, logits = chain_greedy(path, cuts, ids, N_NEW)
        assert tokens == ref_tokens
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)


def test_hidden_state_window_rejects_wrong_shape(smollm2):
    path = slice_window(smollm2, WindowSpec(10, 20, Role.MIDDLE), progress=False)
    with LayerWindow(path, takes_tokens=False, gives_logits=False, n_ctx=64) as w:
        with pytest.raises(ValueError):
            w.forward(np.zeros((2, w.n_embd + 1), dtype=np.float32), 0)
        out = w.forward(np.ones((3, w.n_embd), dtype=np.float32), 0)
        assert out.hidden.shape == (3, w.n_embd) and np.isfinite(out.hidden).all()
        assert not np.allclose(out.hidden, 1.0)  # the layers did something

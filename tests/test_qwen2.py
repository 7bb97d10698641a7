"""Qwen2 (attention biases, Q4_K_M blocks) split over a ring of 3 agents: the unsplit model's greedy tokens.

A module of its own: one broker carries one cluster at a time.
"""

from __future__ import annotations

import numpy as np

from homering.models.gguf_file import read_gguf
from homering.models.slicing import Role, WindowSpec, slice_window
from tests.test_equivalence import chain_greedy


def test_qwen2_windows_chain_to_the_unsplit_logits(qwen2_small, qwen2_small_ref, tmp_path, monkeypatch):
    """First, middle and last windows (with their bias tensors) reproduce the unsplit tokens and logits."""
    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    middle = read_gguf(slice_window(qwen2_small, WindowSpec(2, 4, Role.MIDDLE), progress=False))
    names = {t.name for t in middle.tensors}
    assert {f"blk.{i}.attn_{x}.bias" for i in (0, 1) for x in "qkv"} <= names and "blk.2.attn_q.bias" not in names
    assert middle.get("qwen2.block_count") == 2
    ids = qwen2_small_ref.tokenize("The capital of France is")
    ref_tokens, ref_logits = qwen2_small_ref.greedy(ids, 8)
    tokens, logits = chain_greedy(qwen2_small, [0, 2, 4, 6], ids, 8)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)


def test_qwen2_shape_for_the_planner(qwen2_small):
    """The planner's model inputs count a qwen2 block's biases and its 2 KV heads of 64."""
    from homering.models.gguf_info import inspect_gguf
    from homering.planner.model import shape_from_gguf

    info = inspect_gguf(qwen2_small)
    assert (info.arch, info.n_layers, info.n_embd) == ("qwen2", 6, 896)
    gf = read_gguf(qwen2_small)
    biases = sum(t.n_bytes for t in gf.tensors if t.name.startswith("blk.0.") and t.name.endswith(".bias"))
    assert biases == 4 * (896 + 128 + 128)
    assert info.layer_bytes[0] == sum(t.n_bytes for t in gf.tensors if t.name.startswith("blk.0."))
    shape = shape_from_gguf(qwen2_small, n_ctx=256)
    assert shape.n_layers == 6 and shape.hidden_bytes == 4 * 896
    assert shape.kv_bytes_per_layer == 256 * 2 * (64 + 64) * 2  # f16 K and V

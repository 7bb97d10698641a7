"""Qwen3, Qwen3-MoE, Phi-3 and Gemma 2 layer windows: the unsplit model's greedy tokens, and the refusal of
architectures homering cannot split (issue 23).

Chains of windows in one process (tests/test_equivalence.py's ``chain_greedy``); the same models over a
ring of 3 agents are in tests/test_rounds.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from homering.models import gguf_file as gfile
from homering.models.gguf_file import TensorSource, read_gguf, write_gguf
from homering.models.slicing import Role, WindowSpec, slice_window
from homering.models.support import UnsupportedModel, check_splittable, split_problem
from tests.test_equivalence import chain_greedy
from tests.test_models import assert_clean_error, homering

N_NEW = 24
PROMPT = "The capital of France is"

SPLITS = [
    ("qwen3_small", [0, 2, 3, 6]),
    ("qwen3moe_small", [0, 1, 5, 6]),  # a window of a single MoE layer, first and last
    ("qwen3moe_small", [0, 3, 4, 6]),  # a single MoE layer in the middle
    ("phi3_small", [0, 2, 3, 6]),
    ("gemma2_small", [0, 1, 3, 6]),  # windows start at layer 1 and 3: inside gemma2's period of 2
    ("gemma2_small", [0, 3, 4, 5, 6]),
]


@pytest.mark.parametrize("model,cuts", SPLITS, ids=[f"{m}-{c}" for m, c in SPLITS])
def test_chain_matches_unsplit(request, model, cuts, tmp_path, monkeypatch):
    """Greedy tokens identical to the unsplit model's, logits after the prompt within 1e-4, tokens that vary."""
    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    path, ref = request.getfixturevalue(model), request.getfixturevalue(f"{model}_ref")
    ids = ref.tokenize(PROMPT)
    ref_tokens, ref_logits = ref.greedy(ids, N_NEW)
    tokens, logits = chain_greedy(path, cuts, ids, N_NEW)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    assert len(set(ref_tokens)) >= 3, ref_tokens  # a model that repeats one token would hide a broken split


def test_window_metadata_and_tensors(qwen3moe_small, phi3_small, gemma2_small, tmp_path, monkeypatch):
    """What moves with the layers: experts and router, fused tensors, per-head norms, sliding-window flags."""
    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    moe = read_gguf(slice_window(qwen3moe_small, WindowSpec(3, 4, Role.MIDDLE), progress=False))
    names = {t.name for t in moe.tensors}
    assert {f"blk.0.{n}.weight" for n in ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")} <= names
    assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names and "blk.1.attn_q.weight" not in names
    assert (moe.get("qwen3moe.expert_count"), moe.get("qwen3moe.expert_used_count")) == (8, 2)
    assert next(t.dims for t in moe.tensors if t.name == "blk.0.ffn_up_exps.weight") == (1024, 768, 8)
    phi = read_gguf(slice_window(phi3_small, WindowSpec(2, 3, Role.MIDDLE), progress=False))
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= {t.name for t in phi.tensors}
    gem = read_gguf(slice_window(gemma2_small, WindowSpec(1, 3, Role.MIDDLE), progress=False))
    # llama.cpp's gemma2 default: even layers slide; a window from layer 1 would count from its own 0
    assert gem.get("gemma2.attention.sliding_window_pattern") == [False, True]
    assert gem.get("gemma2.final_logit_softcapping") == 30.0 and gem.get("gemma2.attn_logit_softcapping") == 50.0


def _foreign_gguf(path, arch: str = "mamba", n_layers: int = 2, extra: dict | None = None):
    """A small GGUF of another architecture (header and a float32 tensor per block)."""
    enc = gfile.encode_field
    entries = [
        enc("general.architecture", gfile.STRING, arch),
        enc(f"{arch}.block_count", gfile.UINT32, n_layers),
        *(enc(f"{arch}.{k}", gfile.UINT32, v) for k, v in {"embedding_length": 64, **(extra or {})}.items()),
    ]
    data = np.ones(64, dtype="<f4").tobytes()
    tensors = [TensorSource(f"blk.{i}.norm.weight", (64,), 0, len(data), data=data) for i in range(n_layers)]
    with open(path, "wb") as fh:
        write_gguf(fh, entries, tensors)
    return path


def test_unsupported_architecture_is_refused_everywhere(tmp_path, monkeypatch):
    """slice_window, the planner's model shape and the checker refuse it in one line naming the architecture."""
    from homering.planner.model import shape_from_gguf

    monkeypatch.setenv("HOMERING_HOME", str(tmp_path / "home"))
    bad = _foreign_gguf(tmp_path / "foreign.gguf")
    for call in (
        lambda: check_splittable(bad),
        lambda: slice_window(bad, WindowSpec(0, 1, Role.FIRST), progress=False),
        lambda: shape_from_gguf(bad, n_ctx=256),
    ):
        with pytest.raises(UnsupportedModel, match="architecture 'mamba' is not supported") as exc:
            call()
        assert "\n" not in str(exc.value) and "qwen3moe" in str(exc.value)
    assert not list((tmp_path / "home").rglob("*.gguf"))


def test_gemma_27b_attention_scale_is_refused(tmp_path):
    """llama.cpp scales Gemma 2 27B's attention by n_embd/n_head only at 46 layers: its windows would differ."""
    extra = {"attention.head_count": 32, "attention.key_length": 128}
    big = _foreign_gguf(tmp_path / "g27.gguf", "gemma2", 46, {**extra, "embedding_length": 4608})
    assert "46 layers" in (split_problem(read_gguf(big)) or "")
    fine = _foreign_gguf(tmp_path / "g9.gguf", "gemma2", 42, extra)
    assert split_problem(read_gguf(fine)) is None


@pytest.mark.parametrize("command", ["up", "controller"])
def test_cli_refuses_before_any_agent_loads(command, tmp_path):
    """`homering up` and `homering controller` exit with one line before starting a broker or an agent."""
    bad = _foreign_gguf(tmp_path / "foreign.gguf")
    home = tmp_path / "home"
    args = ["--broker", "mqtt://127.0.0.1:9"] if command == "controller" else ["--agents", "3"]
    proc = homering(command, "--model", str(bad), *args, env={**os.environ, "HOMERING_HOME": str(home)})
    assert_clean_error(proc, "'mamba'", "foreign.gguf")
    assert not (home / "windows").exists() and not (home / "profiles").exists()


def test_models_list_shows_architecture_size_active_size_and_support(tmp_path):
    """A MoE shows the bytes a token uses beside its size; a dense model only its size."""
    proc = homering("models", "list", env={**os.environ, "HOMERING_HOME": str(tmp_path), "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "qwen3moe · 18.55 GB · 2.11 GB active · splits" in text
    assert "gemma2 · " in text and "phi3 · " in text and "qwen3 · 0.39 GB · splits" in text
    assert "llama · 0.10 GB · splits" in text

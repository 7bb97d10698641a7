"""Synthetic models: random weights at real Llama 3 shapes that llama.cpp loads and runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from homering.errors import ModelError
from homering.models.gguf_file import read_gguf
from homering.models.registry import SYNTHETIC_MODELS, resolve_model
from homering.models.synth import QUANTS, SHAPES, expected_size, synthesize, tensor_bytes
from tests.reference import Reference
from tests.test_equivalence import chain_greedy
from tests.test_models import assert_clean_error, homering

N_VOCAB = 49152  # SmolLM2's tokenizer
TEXTS = ["The capital of France is", "def fibonacci(n):\n    return", "<|im_start|>user\nHi there!<|im_end|>"]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synth")


@pytest.fixture(scope="module")
def q4(synth_dir) -> Path:
    """llama3.2-1b Q4_0 with 2 of its 16 layers."""
    return synthesize("llama3.2-1b", "q4_0", synth_dir / "1b-q4_0-2l.gguf", n_layers=2, progress=False)


@pytest.fixture(scope="module")
def q8(synth_dir) -> Path:
    """llama3.2-1b Q8_0 with 3 layers (enough for a first, a middle and a last window)."""
    return synthesize("llama3.2-1b", "q8_0", synth_dir / "1b-q8_0-3l.gguf", n_layers=3, progress=False)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def check_greedy(path: Path, n_new: int = 6) -> list[int]:
    """A few greedy steps with llama.cpp: finite, non-constant logits and valid token ids."""
    ref = Reference(path, n_ctx=64)
    try:
        assert ref.llm.n_vocab() == N_VOCAB
        tokens, logits = ref.greedy(ref.tokenize(TEXTS[0]), n_new)
        assert logits.shape == (N_VOCAB,) and np.isfinite(logits).all()
        assert 0.1 < logits.std() < 100
        assert all(0 <= t < N_VOCAB for t in tokens)
        return tokens
    finally:
        ref.close()


@pytest.mark.parametrize("quant,n_layers", [("q4_0", 2), ("q8_0", 3)])
def test_size_metadata_and_tensors(request, quant, n_layers):
    path = request.getfixturevalue("q4" if quant == "q4_0" else "q8")
    assert path.stat().st_size == expected_size("llama3.2-1b", quant, n_layers)
    assert not path.with_name(path.name + ".partial").exists()

    gf = read_gguf(path)
    assert gf.get("general.file_type") == {"q4_0": 2, "q8_0": 7}[quant]
    names = {t.name: t for t in gf.tensors}
    assert "output.weight" not in names  # tied, as Llama 3.2
    assert names["token_embd.weight"].dims == (2048, N_VOCAB)
    assert names["blk.1.attn_k.weight"].dims == (2048, 512)  # 8 kv heads of 64
    assert names["blk.1.ffn_down.weight"].dims == (8192, 2048)
    weight_type = {"q4_0": 2, "q8_0": 8}[quant]
    for t in gf.tensors:
        assert t.ggml_type == (0 if t.name.endswith("norm.weight") else weight_type), t.name
    assert names["blk.0.attn_q.weight"].n_bytes == 2048 * 2048 // 32 * {"q4_0": 18, "q8_0": 34}[quant]

    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)
    try:
        assert llm.n_vocab() == N_VOCAB
        md = llm.metadata
        assert md["general.architecture"] == "llama"
        assert md["llama.block_count"] == str(n_layers)
        assert md["llama.embedding_length"] == "2048"
        assert md["llama.feed_forward_length"] == "8192"
        assert md["llama.attention.head_count"] == "32"
        assert md["llama.attention.head_count_kv"] == "8"
        assert md["llama.rope.dimension_count"] == "64"
        assert float(md["llama.rope.freq_base"]) == 500000.0
        assert md["llama.context_length"] == "131072"
    finally:
        llm.close()


def test_tokenizer_is_smollm2s(q4, smollm2):
    ours = llama_cpp.Llama(str(q4), vocab_only=True, verbose=False)
    theirs = llama_cpp.Llama(str(smollm2), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            ids = ours.tokenize(text.encode(), add_bos=True, special=True)
            assert ids == theirs.tokenize(text.encode(), add_bos=True, special=True)
            assert ours.detokenize(ids) == theirs.detokenize(ids)
        assert ours.token_eos() == theirs.token_eos()
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("fixture", ["q4", "q8"])
def test_greedy_decoding_is_finite(request, fixture):
    check_greedy(request.getfixturevalue(fixture))


def test_untied_llama3_8b_has_an_output_head(synth_dir):
    path = synthesize("llama3-8b", "q4_0", synth_dir / "8b-1l.gguf", n_layers=1, progress=False)
    assert path.stat().st_size == expected_size("llama3-8b", "q4_0", 1)
    names = {t.name: t for t in read_gguf(path).tensors}
    assert names["output.weight"].dims == (4096, N_VOCAB)
    assert names["blk.0.ffn_gate.weight"].dims == (4096, 14336)
    check_greedy(path, n_new=2)
    path.unlink()


def test_same_seed_same_bytes(q4, synth_dir):
    again = synthesize("llama3.2-1b", "q4_0", synth_dir / "again.gguf", n_layers=2, progress=False)
    other = synthesize("llama3.2-1b", "q4_0", synth_dir / "other.gguf", n_layers=2, seed=1, progress=False)
    try:
        assert sha256(again) == sha256(q4)
        assert sha256(other) != sha256(q4)
        assert other.stat().st_size == q4.stat().st_size
    finally:
        again.unlink()
        other.unlink()


def test_windows_of_a_synthetic_model_match_it(q8, tmp_path, monkeypatch):
    """First, middle and last window (the repo's slicing) reproduce the unsplit greedy tokens."""
    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))  # window files go to a throwaway cache
    ref = Reference(q8, n_ctx=512)
    try:
        ids = ref.tokenize(TEXTS[1])
        ref_tokens, ref_logits = ref.greedy(ids, 16)
    finally:
        ref.close()
    tokens, logits = chain_greedy(q8, [0, 1, 2, 3], ids, 16)
    assert tokens == ref_tokens
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)


def test_interrupted_run_leaves_no_file(tmp_path):
    half = tensor_bytes("llama3.2-1b", "q4_0", n_layers=2) // 2
    written = []

    def interrupt_halfway(n: int) -> None:
        written.append(n)
        if sum(written) > half:
            raise KeyboardInterrupt

    out = tmp_path / "m.gguf"
    with pytest.raises(KeyboardInterrupt):
        synthesize("llama3.2-1b", "q4_0", out, n_layers=2, progress=False, on_bytes=interrupt_halfway)
    assert sum(written) > half  # stopped mid-way, with data written to the partial file
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments():
    with pytest.raises(ModelError, match="unknown synthetic shape"):
        expected_size("llama9", "q4_0")
    with pytest.raises(ModelError, match="quantisation"):
        synthesize("llama3.2-1b", "q5_k", Path("/nonexistent/x.gguf"))
    with pytest.raises(ModelError, match="n_layers"):
        expected_size("llama3.2-1b", "q4_0", 0)


def test_cli_writes_then_refuses_to_overwrite(tmp_path):
    out = tmp_path / "cli.gguf"
    args = ("models", "synth", "--shape", "llama3.2-1b", "--quant", "q4_0", "--out", str(out), "--layers", "1")
    proc = homering(*args)
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and str(out.stat().st_size) in proc.stdout
    assert out.stat().st_size == expected_size("llama3.2-1b", "q4_0", 1)
    mtime = out.stat().st_mtime_ns
    assert_clean_error(homering(*args), "exists", "--force")
    assert out.stat().st_mtime_ns == mtime
    assert homering(*args, "--seed", "3", "--force").returncode == 0
    assert out.stat().st_mtime_ns != mtime


def test_registry_names(tmp_path, monkeypatch):
    assert set(SYNTHETIC_MODELS) == {f"{s}-{q}" for s in SHAPES for q in QUANTS}
    assert {"llama3-8b-q4_0", "llama3.2-3b-q4_0", "llama3.2-1b-q4_0", "llama3.2-1b-q8_0"} <= set(SYNTHETIC_MODELS)
    # the CLI's --shape/--quant choices are the module's
    from homering.cli import models_synth

    choices = {p.name: set(p.type.choices) for p in models_synth.params if p.name in ("shape", "quant")}
    assert choices == {"shape": set(SHAPES), "quant": set(QUANTS)}

    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    with pytest.raises(ModelError, match="not synthesized yet"):
        resolve_model("llama3.2-3b-q4_0", pull_missing=False)
    proc = homering("models", "list")
    assert proc.returncode == 0
    assert "llama3.2-3b-q4_0" in proc.stdout and "random-weight models are made on first use" in proc.stdout


# llama.cpp's ggml types: F32 0, Q5_0 6, Q8_0 8, Q4_K 12, Q6_K 14
def test_qwen2_q4_k_m_layout(qwen2_small):
    """Qwen2.5-0.5B's blocks at Q4_K_M: biases, tied head, and llama.cpp's Q4_K_M types (use_more_bits layers
    2 and 5 of 6 get Q6_K; rows of 896 values fall back from Q4_K/Q6_K to Q5_0/Q8_0)."""
    gf = read_gguf(qwen2_small)
    assert gf.arch == "qwen2" and gf.get("general.file_type") == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert gf.get("qwen2.block_count") == 6 and gf.get("qwen2.attention.head_count_kv") == 2
    t = {x.name: x for x in gf.tensors}
    assert "output.weight" not in t and t["token_embd.weight"].ggml_type == 8  # the tied head: Q6_K -> Q8_0
    assert (t["blk.0.attn_q.bias"].dims, t["blk.0.attn_k.bias"].dims) == ((896,), (128,))
    assert t["blk.0.attn_q.bias"].ggml_type == 0 and t["blk.5.attn_v.bias"].ggml_type == 0
    more = {2, 5}
    for i in range(6):
        assert t[f"blk.{i}.ffn_down.weight"].ggml_type == (14 if i in more else 12), i
        assert t[f"blk.{i}.attn_v.weight"].ggml_type == (8 if i in more else 6), i
        assert t[f"blk.{i}.ffn_up.weight"].ggml_type == t[f"blk.{i}.attn_q.weight"].ggml_type == 6


def _scales(path: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d, dmin or empty, dequantized values) of the first 64 blocks of a tensor."""
    import gguf

    gf = read_gguf(path)
    t = next(x for x in gf.tensors if x.name == name)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(t.ggml_type)]
    with open(path, "rb") as f:
        f.seek(t.offset)
        raw = np.frombuffer(f.read(64 * size), dtype=np.uint8).reshape(64, size)
    d_at = {12: 0, 14: 208}.get(t.ggml_type, 0)
    d = raw[:, d_at : d_at + 2].copy().view("<f2").astype(np.float32).ravel()
    dmin = raw[:, 2:4].copy().view("<f2").astype(np.float32).ravel() if t.ggml_type == 12 else np.array([])
    values = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.ggml_type)).ravel()
    return d, dmin, values


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.2.ffn_down.weight", "blk.0.attn_q.weight"])
def test_k_quant_blocks_have_finite_small_scales(qwen2_small, name):
    """Every block's float16 scales are finite and small, and the values are centred with rms 1/sqrt(ne0)."""
    d, dmin, values = _scales(qwen2_small, name)
    fan_in = 4864 if "ffn_down" in name else 896
    assert np.isfinite(d).all() and (np.abs(d) > 0).all() and (np.abs(d) < 1e-2).all()
    if dmin.size:  # Q4_K: dmin = 4 d, so a value is 8 d (q - 7.5)
        np.testing.assert_array_equal(dmin, 4 * d)
    assert np.isfinite(values).all()
    assert abs(float(np.sqrt(np.mean(values**2))) * fan_in**0.5 - 1) < 0.1
    assert abs(float(values.mean())) * fan_in**0.5 < 0.1


def test_qwen2_32b_size_without_writing_it():
    """QwQ-32B's shape at Q4_K_M: sizes computed from the rule, close to the real file (19.85 GB)."""
    q4k, q6k = 144 / 256, 210 / 256
    e, ff, kv, vocab, n = 5120, 27648, 1024, 152064, 64
    more = [i < 8 or i >= 56 or (i - 8) % 3 == 2 for i in range(n)]
    per_layer = (2 * e * e + e * kv + 2 * e * ff) * q4k + 4 * (2 * e + e + 2 * kv)
    layers = n * per_layer + sum((e * kv + ff * e) * (q6k if m else q4k) for m in more)
    expected = e * vocab * q4k + e * vocab * q6k + 4 * e + layers
    assert tensor_bytes("qwen2.5-32b", "q4_k_m") == int(expected)
    size = expected_size("qwen2.5-32b", "q4_k_m")
    assert 19.6e9 < size < 20.0e9
    assert 1.6e9 < expected_size("qwen2.5-32b", "q4_k_m", n_layers=2) < 1.7e9  # head and embedding: 1.1 GB


def test_padded_vocabulary_tokenizes_as_smollm2(synth_dir, smollm2):
    """A vocabulary padded with [PAD<id>] tokens (as Qwen's) keeps SmolLM2's tokenization."""
    path = synthesize("qwen2.5-0.5b", "q8_0", synth_dir / "pad.gguf", n_layers=1, n_vocab=N_VOCAB + 64, progress=False)
    ours = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    theirs = llama_cpp.Llama(str(smollm2), vocab_only=True, verbose=False)
    try:
        assert ours.n_vocab() == N_VOCAB + 64
        for text in TEXTS:
            ids = ours.tokenize(text.encode(), add_bos=True, special=True)
            assert ids == theirs.tokenize(text.encode(), add_bos=True, special=True)
    finally:
        ours.close()
        theirs.close()
    assert read_gguf(path).fields["tokenizer.ggml.tokens"].length == N_VOCAB + 64
    with pytest.raises(ModelError, match="smaller than"):
        expected_size("qwen2.5-0.5b", "q8_0", 1, n_vocab=1000)
    path.unlink()

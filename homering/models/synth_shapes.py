"""The shapes of :mod:`homering.models.synth`: hyper-parameters, tensor lists and metadata per architecture.

A :class:`Shape` describes one real model (or a reduced one, said in its name
and title); :func:`tensor_plan` lists every tensor of its GGUF in file order and
:func:`arch_metadata` the architecture's keys, as llama.cpp's loaders read them
(``src/models/<arch>.cpp`` of llama.cpp as vendored by llama-cpp-python 0.3.36):

- ``llama`` / ``qwen2``: ``attn_q/k/v``, ``attn_output``, SwiGLU ``ffn_gate/up/down``; Qwen2 adds
  ``attn_q/k/v.bias``;
- ``qwen3``: per-head RMS norms ``attn_q_norm``/``attn_k_norm`` (``head_dim`` floats), and a head size of
  its own (``attention.key_length``/``value_length``: 128 while ``n_embd / n_head`` is 64 for the 0.6B);
- ``qwen3moe``: the same attention; the feed-forward is a router ``ffn_gate_inp`` (float32,
  ``n_embd × n_expert``) and ``ffn_{gate,up,down}_exps`` (3-D, one matrix per expert),
  ``expert_count``, ``expert_used_count`` (top-k), ``expert_feed_forward_length``; no shared experts;
- ``phi3``: fused ``attn_qkv`` (``n_embd × 3·n_embd``) and fused ``ffn_up`` (``n_embd × 2·n_ff``: gate
  and up; no ``ffn_gate``);
- ``gemma2``: ``post_attention_norm`` and ``post_ffw_norm`` per block, a tied head, sliding-window
  attention on even layers (``attention.sliding_window``; llama.cpp's default pattern of 2),
  ``attn_logit_softcapping`` and ``final_logit_softcapping``.
"""

from __future__ import annotations

from dataclasses import dataclass

from homering.models import gguf_file as gfile
from homering.models.gguf_file import DEFAULT_ALIGNMENT, tensor_nbytes
from homering.models.random_weights import GGML_TYPE_F32, Quant, TensorPlan


@dataclass(frozen=True)
class Shape:
    """The hyper-parameters of one model family member (all counts, no units unless said).

    Attributes:
        name: the shape's name (``llama3.2-3b`` …).
        n_layers: transformer blocks.
        n_embd: hidden size (floats per hidden state).
        n_ff: feed-forward (SwiGLU) inner size (MoE: the dense size llama.cpp reads, unused by qwen3moe).
        n_head: attention (query) heads.
        n_head_kv: key/value heads (grouped-query attention).
        rope_theta: RoPE frequency base.
        rms_eps: RMS-norm epsilon.
        n_ctx_train: training context length in tokens.
        tied: True when the output head is the token embedding (no ``output.weight``).
        title: the real model this mimics, for listings.
        arch: llama.cpp's architecture name (``general.architecture``).
        bias: True when blocks have ``attn_q/k/v.bias`` (Qwen2).
        n_vocab: the real model's embedding rows (the tokenizer is padded to it), or None for SmolLM2's.
        head_dim_kv: the head size when it is not ``n_embd / n_head`` (Qwen3, Gemma 2), else None.
        qk_norm: per-head RMS norms of Q and K (Qwen3).
        n_expert: experts per MoE layer (0: a dense model).
        n_expert_used: experts each token is routed to (top-k).
        n_ff_exp: one expert's feed-forward inner size.
        fused: fused ``attn_qkv`` and gate+up ``ffn_up`` (Phi-3).
        sliding_window: sliding-window size in tokens (Gemma 2; 0: none).
        attn_softcap: attention logit soft-capping (Gemma 2; 0: none).
        final_softcap: final logit soft-capping (Gemma 2; 0: none).
        post_norms: ``post_attention_norm`` and ``post_ffw_norm`` in every block (Gemma 2).
    """

    name: str
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    rope_theta: float
    rms_eps: float
    n_ctx_train: int
    tied: bool
    title: str
    arch: str = "llama"
    bias: bool = False
    n_vocab: int | None = None
    head_dim_kv: int | None = None
    qk_norm: bool = False
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    fused: bool = False
    sliding_window: int = 0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    post_norms: bool = False

    @property
    def head_dim(self) -> int:
        return self.head_dim_kv or self.n_embd // self.n_head


_QWEN3 = dict(arch="qwen3", head_dim_kv=128, qk_norm=True, n_vocab=151936)
_QWEN3MOE = dict(arch="qwen3moe", head_dim_kv=128, qk_norm=True, n_vocab=151936)
SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama3-8b", 32, 4096, 14336, 32, 8, 500000.0, 1e-5, 8192, False, "Meta-Llama-3-8B"),
        Shape("llama3.2-3b", 28, 3072, 8192, 24, 8, 500000.0, 1e-5, 131072, True, "Llama-3.2-3B"),
        Shape("llama3.2-1b", 16, 2048, 8192, 32, 8, 500000.0, 1e-5, 131072, True, "Llama-3.2-1B"),
        Shape("qwen2.5-32b", 64, 5120, 27648, 40, 8, 1e6, 1e-5, 40960, False, "QwQ-32B", "qwen2", True, 152064),
        Shape("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 1e6, 1e-6, 32768, True, "Qwen2.5-0.5B", "qwen2", True, 151936),
        Shape("qwen3-0.6b", 28, 1024, 3072, 16, 8, 1e6, 1e-6, 40960, True, "Qwen3-0.6B", **_QWEN3),  # type: ignore[arg-type]
        Shape(
            "qwen3-30b-a3b",
            48,
            2048,
            6144,
            32,
            4,
            1e6,
            1e-6,
            40960,
            False,
            "Qwen3-30B-A3B",
            n_expert=128,
            n_expert_used=8,
            n_ff_exp=768,
            **_QWEN3MOE,  # type: ignore[arg-type]
        ),  # fmt: skip
        Shape(
            "qwen3moe-tiny",
            6,
            1024,
            3072,
            16,
            4,
            1e6,
            1e-6,
            40960,
            False,
            "a reduced Qwen3-MoE (6 layers, 8 experts)",
            n_expert=8,
            n_expert_used=2,
            n_ff_exp=768,
            **_QWEN3MOE,  # type: ignore[arg-type]
        ),  # fmt: skip
        Shape(
            "phi3-mini",
            32,
            3072,
            8192,
            32,
            32,
            10000.0,
            1e-5,
            4096,
            False,
            "Phi-3-mini-4k",
            arch="phi3",
            n_vocab=32064,
            fused=True,
        ),  # fmt: skip
        Shape(
            "gemma2-2b",
            26,
            2304,
            9216,
            8,
            4,
            10000.0,
            1e-6,
            8192,
            True,
            "Gemma-2-2B",
            arch="gemma2",
            n_vocab=256000,
            head_dim_kv=256,
            sliding_window=4096,
            attn_softcap=50.0,
            final_softcap=30.0,
            post_norms=True,
        ),  # fmt: skip
    )
}


def _attention(s: Shape, b: str, w, f32) -> list[TensorPlan]:  # noqa: ANN001 - the two makers of tensor_plan
    e, kv, nq = s.n_embd, s.n_head_kv * s.head_dim, s.n_head * s.head_dim
    out = [f32(b + "attn_norm.weight", e)]
    if s.fused:
        out.append(w(b + "attn_qkv.weight", e, nq + 2 * kv))
    else:
        out += [w(b + "attn_q.weight", e, nq), w(b + "attn_k.weight", e, kv), w(b + "attn_v.weight", e, kv)]
    if s.bias:
        out += [f32(b + "attn_q.bias", nq), f32(b + "attn_k.bias", kv), f32(b + "attn_v.bias", kv)]
    if s.qk_norm:
        out += [f32(b + "attn_k_norm.weight", s.head_dim), f32(b + "attn_q_norm.weight", s.head_dim)]
    out.append(w(b + "attn_output.weight", nq, e))
    if s.post_norms:
        out.append(f32(b + "post_attention_norm.weight", e))
    return out


def _feed_forward(s: Shape, b: str, w, f32) -> list[TensorPlan]:  # noqa: ANN001
    e = s.n_embd
    out = [f32(b + "ffn_norm.weight", e)]
    if s.n_expert:
        ne, ff = s.n_expert, s.n_ff_exp
        out += [
            TensorPlan(b + "ffn_gate_inp.weight", (e, ne), GGML_TYPE_F32, 4 * e * ne),  # llama.cpp keeps the router f32
            w(b + "ffn_gate_exps.weight", e, ff, ne),
            w(b + "ffn_down_exps.weight", ff, e, ne),
            w(b + "ffn_up_exps.weight", e, ff, ne),
        ]
    elif s.fused:
        out += [w(b + "ffn_up.weight", e, 2 * s.n_ff), w(b + "ffn_down.weight", s.n_ff, e)]
    else:
        out += [w(b + "ffn_gate.weight", e, s.n_ff), w(b + "ffn_up.weight", e, s.n_ff)]
        out.append(w(b + "ffn_down.weight", s.n_ff, e))
    if s.post_norms:
        out.append(f32(b + "post_ffw_norm.weight", e))
    return out


def tensor_plan(s: Shape, q: Quant, n_layers: int, n_vocab: int) -> list[TensorPlan]:
    """Every tensor of the file, in file order (embedding, blocks in order, output norm and head)."""

    def w(name: str, ne0: int, ne1: int, ne2: int | None = None, *, layer: int | None = None) -> TensorPlan:
        # a tied embedding is the output head: llama.cpp's Q4_K_M gives it the head's type
        role = "output.weight" if name == "token_embd.weight" and s.tied else name
        t = q.block_for(role, ne0, layer, n_layers).ggml_type
        dims = (ne0, ne1) if ne2 is None else (ne0, ne1, ne2)
        return TensorPlan(name, dims, t, tensor_nbytes(dims, t))

    def f32(name: str, n: int) -> TensorPlan:
        return TensorPlan(name, (n,), GGML_TYPE_F32, 4 * n)

    out = [w("token_embd.weight", s.n_embd, n_vocab)]
    for i in range(n_layers):

        def wl(name: str, ne0: int, ne1: int, ne2: int | None = None, _i: int = i) -> TensorPlan:
            return w(name, ne0, ne1, ne2, layer=_i)

        out += _attention(s, f"blk.{i}.", wl, f32) + _feed_forward(s, f"blk.{i}.", wl, f32)
    out.append(f32("output_norm.weight", s.n_embd))
    if not s.tied:
        out.append(w("output.weight", s.n_embd, n_vocab))
    return out


def arch_metadata(s: Shape, n_layers: int, n_vocab: int, *, sliding_window: int | None = None) -> list[bytes]:
    """The ``<arch>.*`` keys of the shape (``sliding_window`` replaces the shape's window size, for tests)."""
    enc, U32, F32 = gfile.encode_field, gfile.UINT32, gfile.FLOAT32
    a = s.arch
    out = [
        enc(f"{a}.block_count", U32, n_layers),
        enc(f"{a}.context_length", U32, s.n_ctx_train),
        enc(f"{a}.embedding_length", U32, s.n_embd),
        enc(f"{a}.feed_forward_length", U32, s.n_ff),
        enc(f"{a}.attention.head_count", U32, s.n_head),
        enc(f"{a}.attention.head_count_kv", U32, s.n_head_kv),
        enc(f"{a}.rope.freq_base", F32, s.rope_theta),
        enc(f"{a}.attention.layer_norm_rms_epsilon", F32, s.rms_eps),
        enc(f"{a}.rope.dimension_count", U32, s.head_dim),
        enc(f"{a}.vocab_size", U32, n_vocab),
    ]
    if s.head_dim_kv:
        out += [enc(f"{a}.attention.key_length", U32, s.head_dim), enc(f"{a}.attention.value_length", U32, s.head_dim)]
    if s.n_expert:
        out += [
            enc(f"{a}.expert_count", U32, s.n_expert),
            enc(f"{a}.expert_used_count", U32, s.n_expert_used),
            enc(f"{a}.expert_feed_forward_length", U32, s.n_ff_exp),
        ]
    window = s.sliding_window if sliding_window is None else sliding_window
    if window:
        out.append(enc(f"{a}.attention.sliding_window", U32, window))
    if s.attn_softcap:
        out.append(enc(f"{a}.attn_logit_softcapping", F32, s.attn_softcap))
    if s.final_softcap:
        out.append(enc(f"{a}.final_logit_softcapping", F32, s.final_softcap))
    return out


def active_fraction(s: Shape) -> float:
    """Share of a block's weights one token uses: 1 for a dense shape, (attention + top-k experts + router) /
    all for a MoE shape (parameter counts, so independent of the quantisation)."""
    if not s.n_expert:
        return 1.0
    e, kv, nq = s.n_embd, s.n_head_kv * s.head_dim, s.n_head * s.head_dim
    attn = e * (nq + 2 * kv) + nq * e + e * s.n_expert
    expert = 3 * e * s.n_ff_exp
    return (attn + s.n_expert_used * expert) / (attn + s.n_expert * expert)


__all__ = ["DEFAULT_ALIGNMENT", "SHAPES", "Shape", "active_fraction", "arch_metadata", "tensor_plan"]

"""Random-weight GGUF models with the shapes of real Llama 3 and Qwen2.5 models.

``homering models synth`` (and the registry's synthetic names such as
``llama3.2-3b-q4_0`` or ``qwen2.5-32b-q4_k_m``) write a GGUF file that
llama.cpp loads and runs like the real model: the same architecture
(``llama`` or ``qwen2``), hyper-parameters, tensor names, shapes and
quantisation, hence the same file size (up to the Llama shapes' vocabulary,
see below), memory use and decode speed, but random weights. It is meant for
benchmarks, where only speed and memory matter, without a multi-gigabyte
download.

Shapes (checked against the Hugging Face ``config.json`` of each model, as
mirrored in public copies of ``meta-llama/Meta-Llama-3-8B``,
``meta-llama/Llama-3.2-3B``, ``meta-llama/Llama-3.2-1B``, ``Qwen/QwQ-32B`` and
``Qwen/Qwen2.5-0.5B-Instruct``):

============  =====  ======  ======  =====  =====  ==  =======  =====  ======  ======
shape         arch   layers  n_embd  n_ff   heads  kv  context  theta  vocab   output
============  =====  ======  ======  =====  =====  ==  =======  =====  ======  ======
llama3-8b     llama  32      4096    14336  32     8   8192     5e5    49152   untied
llama3.2-3b   llama  28      3072    8192   24     8   131072   5e5    49152   tied
llama3.2-1b   llama  16      2048    8192   32     8   131072   5e5    49152   tied
qwen2.5-32b   qwen2  64      5120    27648  40     8   40960    1e6    152064  untied
qwen2.5-0.5b  qwen2  24      896     4864   14     2   32768    1e6    151936  tied
============  =====  ======  ======  =====  =====  ==  =======  =====  ======  ======

(kv: key/value heads, grouped-query attention.) Llama: RMS-norm epsilon 1e-5,
no biases. Qwen2: ``attn_q/k/v.bias`` (float32) in every block, RMS-norm
epsilon 1e-5 (QwQ-32B) or 1e-6 (Qwen2.5-0.5B); llama.cpp's ``qwen2`` loader
(``src/models/qwen2.cpp``) takes the output head from the token embedding when
``output.weight`` is missing ("tied"). ``qwen2.5-32b`` is QwQ-32B, the
paper's model, which has Qwen2.5-32B's shape. Qwen2.5-0.5B's rows of 896
values are not a multiple of 256, so its ``q4_k_m`` falls back to Q5_0/Q8_0
there, as llama.cpp's real file does.

**Vocabulary.** The tokenizer is SmolLM2's (:mod:`homering.models.synth_tokenizer`).
The Qwen shapes pad it to their real row count (``[PAD<id>]`` tokens), so
their embedding and head are the real size; the Llama shapes keep SmolLM2's
49152 rows instead of Llama 3's 128256 (smaller than the real files by about
137 MB for llama3.2-3b Q4_0, 365 MB for llama3-8b Q4_0). ``n_vocab=`` overrides
the row count (tests use SmolLM2's own 49152 to stay small). Per-layer tensors
are exactly the real ones.

**Weights** are random blocks of the chosen quantisation (``q4_0``, ``q8_0`` or
``q4_k_m``, llama.cpp's Q4_K/Q6_K mix), scaled so that activations stay finite
through all layers, float32 ones for the norms and small random float32
biases; the same seed gives the same bytes (:mod:`homering.models.random_weights`).

Llama 3.2 rescales RoPE frequencies (``rope_scaling`` type ``llama3``); real
GGUF files carry that as a small ``rope_freqs.weight`` tensor (head_dim / 2
floats). It is left out here: it changes which frequencies a random model
uses, not the work or memory per token.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from homering.errors import ModelError
from homering.models import gguf_file as gfile
from homering.models.gguf_file import DEFAULT_ALIGNMENT, TensorSource, encode_string, tensor_nbytes, write_gguf
from homering.models.random_weights import GGML_TYPE_F32, QUANTS, Quant, ReadAhead, TensorPlan, weight_chunks
from homering.models.synth_tokenizer import tokenizer_entries

__all__ = ["QUANTS", "SHAPES", "Quant", "Shape", "expected_size", "synthesize", "tensor_bytes"]


@dataclass(frozen=True)
class Shape:
    """The hyper-parameters of one model family member (all counts, no units unless said).

    Attributes:
        name: the shape's name (``llama3.2-3b`` …).
        n_layers: transformer blocks.
        n_embd: hidden size (floats per hidden state).
        n_ff: feed-forward (SwiGLU) inner size.
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

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama3-8b", 32, 4096, 14336, 32, 8, 500000.0, 1e-5, 8192, False, "Meta-Llama-3-8B"),
        Shape("llama3.2-3b", 28, 3072, 8192, 24, 8, 500000.0, 1e-5, 131072, True, "Llama-3.2-3B"),
        Shape("llama3.2-1b", 16, 2048, 8192, 32, 8, 500000.0, 1e-5, 131072, True, "Llama-3.2-1B"),
        Shape("qwen2.5-32b", 64, 5120, 27648, 40, 8, 1e6, 1e-5, 40960, False, "QwQ-32B", "qwen2", True, 152064),
        Shape("qwen2.5-0.5b", 24, 896, 4864, 14, 2, 1e6, 1e-6, 32768, True, "Qwen2.5-0.5B", "qwen2", True, 151936),
    )
}


SMOLLM2_VOCAB = 49152  # the tokenizer's own vocabulary size
# Version of the generator, in every file's header: a change of the weights' bytes must bump it, so that the
# file's fingerprint (its first and last 8 MiB) changes and no stale layer-window file is reused.
# 2: Qwen2 shapes, Q4_K_M, random biases.
SYNTH_FORMAT = 2


def _shape_quant(shape: str, quant: str, n_layers: int | None) -> tuple[Shape, Quant, int]:
    if shape not in SHAPES:
        raise ModelError(f"unknown synthetic shape {shape!r}: use one of {', '.join(SHAPES)}")
    if quant not in QUANTS:
        raise ModelError(f"unknown quantisation {quant!r}: use one of {', '.join(QUANTS)}")
    s = SHAPES[shape]
    n = s.n_layers if n_layers is None else int(n_layers)
    if n < 1:
        raise ModelError(f"n_layers must be at least 1, got {n}")
    return s, QUANTS[quant], n


def _tensor_plan(s: Shape, q: Quant, n_layers: int, n_vocab: int) -> list[TensorPlan]:
    """Every tensor of the file, in file order (embedding, blocks in order, output norm and head)."""
    e, kv, nq = s.n_embd, s.n_head_kv * s.head_dim, s.n_head * s.head_dim

    def w(name: str, ne0: int, ne1: int, layer: int | None = None) -> TensorPlan:
        # a tied embedding is the output head: llama.cpp's Q4_K_M gives it the head's type
        role = "output.weight" if name == "token_embd.weight" and s.tied else name
        t = q.block_for(role, ne0, layer, n_layers).ggml_type
        return TensorPlan(name, (ne0, ne1), t, tensor_nbytes((ne0, ne1), t))

    def f32(name: str, n: int) -> TensorPlan:
        return TensorPlan(name, (n,), GGML_TYPE_F32, 4 * n)

    out = [w("token_embd.weight", e, n_vocab)]
    for i in range(n_layers):
        b = f"blk.{i}."
        out += [
            f32(b + "attn_norm.weight", e),
            w(b + "attn_q.weight", e, nq, i),
            w(b + "attn_k.weight", e, kv, i),
            w(b + "attn_v.weight", e, kv, i),
        ]
        if s.bias:
            out += [f32(b + "attn_q.bias", nq), f32(b + "attn_k.bias", kv), f32(b + "attn_v.bias", kv)]
        out += [
            w(b + "attn_output.weight", nq, e, i),
            f32(b + "ffn_norm.weight", e),
            w(b + "ffn_gate.weight", e, s.n_ff, i),
            w(b + "ffn_up.weight", e, s.n_ff, i),
            w(b + "ffn_down.weight", s.n_ff, e, i),
        ]
    out.append(f32("output_norm.weight", e))
    if not s.tied:
        out.append(w("output.weight", e, n_vocab))
    return out


def tensor_bytes(shape: str, quant: str, n_layers: int | None = None, n_vocab: int | None = None) -> int:
    """Bytes of tensor data (without the header and padding) of a synthetic model.

    Needs no tokenizer file; ``n_vocab`` defaults to the shape's real
    vocabulary, or SmolLM2's 49152 for the Llama shapes.
    """
    s, q, n = _shape_quant(shape, quant, n_layers)
    return sum(t.n_bytes for t in _tensor_plan(s, q, n, n_vocab or s.n_vocab or SMOLLM2_VOCAB))


def _metadata(s: Shape, q: Quant, n_layers: int, seed: int, tok_entries: list[bytes], n_vocab: int) -> list[bytes]:
    enc, U32, F32, STR = gfile.encode_field, gfile.UINT32, gfile.FLOAT32, gfile.STRING
    a = s.arch
    return [
        enc("general.architecture", STR, a),
        enc("general.type", STR, "model"),
        enc("general.name", STR, f"synthetic {s.name} {q.name} (random weights)"),
        enc("general.file_type", U32, q.file_type),
        enc("general.quantization_version", U32, 2),
        enc("general.alignment", U32, DEFAULT_ALIGNMENT),
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
        enc("homering.synth.shape", STR, s.name),
        enc("homering.synth.seed", gfile.UINT64, seed),
        enc("homering.synth.format", U32, SYNTH_FORMAT),
        *tok_entries,
    ]


def _header_bytes(entries: list[bytes], tensors: list[TensorPlan]) -> int:
    """Bytes before the tensor data, as :func:`write_gguf` writes them (unpadded)."""
    n = 4 + struct.calcsize("<IQQ") + sum(len(e) for e in entries)
    for t in tensors:
        n += len(encode_string(t.name)) + 4 + 8 * len(t.dims) + 4 + 8
    return n


def _align(n: int, alignment: int = DEFAULT_ALIGNMENT) -> int:
    return -(-n // alignment) * alignment


def expected_size(shape: str, quant: str, n_layers: int | None = None, n_vocab: int | None = None) -> int:
    """The exact size in bytes of the file :func:`synthesize` writes for these arguments.

    Reads SmolLM2's header for the tokenizer (pulling it when missing); the
    seed does not change the size. ``n_vocab`` as in :func:`synthesize`.

    Raises:
        ModelError: unknown shape or quantisation, ``n_layers < 1``, or SmolLM2
            cannot be resolved.
    """
    s, q, n = _shape_quant(shape, quant, n_layers)
    tok, vocab = tokenizer_entries(n_vocab or s.n_vocab)
    tensors = _tensor_plan(s, q, n, vocab)
    entries = _metadata(s, q, n, 0, tok, vocab)
    return _align(_header_bytes(entries, tensors)) + sum(_align(t.n_bytes) for t in tensors)


@contextmanager
def _replaced_on_success(out: Path) -> Iterator[BinaryIO]:
    """``<out>.partial`` opened for writing (``out``'s folder created); renamed to ``out`` when the block ends
    without an error, removed on any error (an interrupt too)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "wb") as fh:
            yield fh
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextmanager
def _byte_counter(
    description: str, total: int, *, bar: bool, on_bytes: Callable[[int], None] | None
) -> Iterator[Callable[[int], None]]:
    """A ``write_gguf`` ``on_bytes`` callback that advances a rich progress bar of ``total`` bytes (on stderr;
    hidden unless ``bar``) and then calls ``on_bytes``."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not bar,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)
            if on_bytes is not None:
                on_bytes(n)

        yield advance


def synthesize(
    shape: str,
    quant: str,
    out: Path,
    *,
    seed: int = 0,
    n_layers: int | None = None,
    n_vocab: int | None = None,
    progress: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Write a random-weight GGUF with a real model's shape; return ``out``.

    Args:
        shape: a key of :data:`SHAPES` (``llama3-8b``, ``llama3.2-3b``, ``llama3.2-1b``,
            ``qwen2.5-32b``, ``qwen2.5-0.5b``).
        quant: ``q4_0`` or ``q8_0`` (the type of every 2-D weight) or ``q4_k_m``
            (llama.cpp's Q4_K/Q6_K mix); norms and biases are float32.
        out: the file to write; an existing file is replaced. Its parent folder
            is created. The data goes to ``<out>.partial`` first and is renamed
            at the end, so an interrupted run leaves no file at ``out`` (and
            removes the partial one unless the process is killed).
        seed: generator seed (any non-negative int); the same arguments give a
            byte-identical file.
        n_layers: number of blocks, instead of the shape's (quick tests at the
            real per-layer shapes).
        n_vocab: embedding rows (the tokenizer is padded to it) instead of the
            shape's (the Qwen shapes' real vocabulary, SmolLM2's 49152 for Llama).
        progress: a rich progress bar (bytes, on stderr) while writing.
        on_bytes: called with the number of tensor bytes just written, as they
            are written (after the progress bar); an exception it raises stops
            the run like an interrupt (no file is left).

    Returns:
        ``out``, whose size is :func:`expected_size` bytes.

    Raises:
        ModelError: unknown shape or quantisation, ``n_layers < 1``, a negative
            seed, ``n_vocab`` below 49152, or SmolLM2 (the tokenizer) cannot be resolved.
        OSError: the file cannot be written.
    """
    s, q, n = _shape_quant(shape, quant, n_layers)
    if seed < 0:
        raise ModelError(f"seed must be non-negative, got {seed}")
    tok, vocab = tokenizer_entries(n_vocab or s.n_vocab)
    plan = _tensor_plan(s, q, n, vocab)
    entries = _metadata(s, q, n, seed, tok, vocab)
    out = Path(out)
    label, total = f"synthesizing {s.name} {q.name} ({n} layers)", sum(t.n_bytes for t in plan)
    ahead = ReadAhead(weight_chunks(plan, seed))
    sources = [TensorSource(t.name, t.dims, t.ggml_type, t.n_bytes, chunks=ahead.take(t.n_bytes)) for t in plan]
    try:
        with (
            _replaced_on_success(out) as fh,
            _byte_counter(label, total, bar=progress, on_bytes=on_bytes) as counted,
        ):
            write_gguf(fh, entries, sources, DEFAULT_ALIGNMENT, on_bytes=counted)
    finally:
        ahead.close()
    return out

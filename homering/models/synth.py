"""Random-weight GGUF models with the shapes of real Llama 3 models.

``homering models synth`` (and the registry's synthetic names such as
``llama3.2-3b-q4_0``) write a GGUF file that llama.cpp loads and runs like
the real model: the same architecture (``llama``), hyper-parameters, tensor
names, shapes and quantisation, hence the same file size (up to the
vocabulary, see below), memory use and decode speed, but random weights. It is
meant for benchmarks, where only speed and memory matter, without a
multi-gigabyte download.

Shapes (checked against the Hugging Face ``config.json`` of each model, as
mirrored in public copies of ``meta-llama/Meta-Llama-3-8B``,
``meta-llama/Llama-3.2-3B`` and ``meta-llama/Llama-3.2-1B``):

===========  ======  ======  ======  =====  ========  ========  =======  ======
shape        layers  n_embd  n_ff    heads  kv heads  head_dim  context  output
===========  ======  ======  ======  =====  ========  ========  =======  ======
llama3-8b    32      4096    14336   32     8         128       8192     untied
llama3.2-3b  28      3072    8192    24     8         128       131072   tied
llama3.2-1b  16      2048    8192    32     8         64        131072   tied
===========  ======  ======  ======  =====  ========  ========  =======  ======

All three: rope theta 500000, RMS-norm epsilon 1e-5, SwiGLU feed-forward, no
biases. "Tied" means the file has no ``output.weight``; llama.cpp then uses
``token_embd.weight`` for the output head, as it does for the real files.

**Vocabulary.** The tokenizer is SmolLM2's (every ``tokenizer.*`` entry of the
registry's ``smollm2`` GGUF is copied verbatim), so ``n_vocab`` is 49152, not
Llama 3's 128256: the token embedding and output head have 49152 rows. This
makes the files smaller than the real ones by (128256 - 49152) rows of the
embedding (and of the output head when untied), at the same quantisation:
about 137 MB for llama3.2-3b Q4_0, 365 MB for llama3-8b Q4_0 (embedding and
output head). Per-layer tensors are exactly the real ones.

**Weights** are random blocks of the chosen quantisation (Q4_0 or Q8_0), scaled
so that activations stay finite through all layers, and float32 ones for the
norms; the same seed gives the same bytes (:mod:`homering.models.random_weights`).

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

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama3-8b", 32, 4096, 14336, 32, 8, 500000.0, 1e-5, 8192, False, "Meta-Llama-3-8B"),
        Shape("llama3.2-3b", 28, 3072, 8192, 24, 8, 500000.0, 1e-5, 131072, True, "Llama-3.2-3B"),
        Shape("llama3.2-1b", 16, 2048, 8192, 32, 8, 500000.0, 1e-5, 131072, True, "Llama-3.2-1B"),
    )
}


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
    e, kv = s.n_embd, s.n_head_kv * s.head_dim

    def w(name: str, ne0: int, ne1: int) -> TensorPlan:
        return TensorPlan(name, (ne0, ne1), q.ggml_type, tensor_nbytes((ne0, ne1), q.ggml_type))

    def norm(name: str) -> TensorPlan:
        return TensorPlan(name, (e,), GGML_TYPE_F32, 4 * e)

    out = [w("token_embd.weight", e, n_vocab)]
    for i in range(n_layers):
        b = f"blk.{i}."
        out += [
            norm(b + "attn_norm.weight"),
            w(b + "attn_q.weight", e, s.n_head * s.head_dim),
            w(b + "attn_k.weight", e, kv),
            w(b + "attn_v.weight", e, kv),
            w(b + "attn_output.weight", s.n_head * s.head_dim, e),
            norm(b + "ffn_norm.weight"),
            w(b + "ffn_gate.weight", e, s.n_ff),
            w(b + "ffn_up.weight", e, s.n_ff),
            w(b + "ffn_down.weight", s.n_ff, e),
        ]
    out.append(norm("output_norm.weight"))
    if not s.tied:
        out.append(w("output.weight", e, n_vocab))
    return out


def tensor_bytes(shape: str, quant: str, n_layers: int | None = None, n_vocab: int = 49152) -> int:
    """Bytes of tensor data (without the header and padding) of a synthetic model.

    Needs no tokenizer file; ``n_vocab`` defaults to SmolLM2's 49152.
    """
    s, q, n = _shape_quant(shape, quant, n_layers)
    return sum(t.n_bytes for t in _tensor_plan(s, q, n, n_vocab))


def _tokenizer_entries() -> tuple[list[bytes], int]:
    """SmolLM2's encoded ``tokenizer.*`` entries (verbatim) and its vocabulary size.

    Resolves the registry's ``smollm2`` model, pulling it when missing.
    """
    from homering.models.gguf_file import read_gguf
    from homering.models.registry import resolve_model

    gf = read_gguf(resolve_model("smollm2", quiet=True))
    entries = [f.raw for k, f in gf.fields.items() if k.startswith("tokenizer.")]
    tokens = gf.fields.get("tokenizer.ggml.tokens")
    if tokens is None or not tokens.length:
        raise ModelError(f"{gf.path} has no tokenizer.ggml.tokens")
    return entries, int(tokens.length)


def _metadata(s: Shape, q: Quant, n_layers: int, seed: int, tok_entries: list[bytes], n_vocab: int) -> list[bytes]:
    enc, U32, F32, STR = gfile.encode_field, gfile.UINT32, gfile.FLOAT32, gfile.STRING
    a = "llama"
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


def expected_size(shape: str, quant: str, n_layers: int | None = None) -> int:
    """The exact size in bytes of the file :func:`synthesize` writes for these arguments.

    Reads SmolLM2's header for the tokenizer (pulling it when missing); the
    seed does not change the size.

    Raises:
        ModelError: unknown shape or quantisation, ``n_layers < 1``, or SmolLM2
            cannot be resolved.
    """
    s, q, n = _shape_quant(shape, quant, n_layers)
    tok, n_vocab = _tokenizer_entries()
    tensors = _tensor_plan(s, q, n, n_vocab)
    entries = _metadata(s, q, n, 0, tok, n_vocab)
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
    progress: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> Path:
    """Write a random-weight GGUF with a real model's shape; return ``out``.

    Args:
        shape: a key of :data:`SHAPES` (``llama3-8b``, ``llama3.2-3b``, ``llama3.2-1b``).
        quant: ``q4_0`` or ``q8_0``: the type of every 2-D weight (norms are float32).
        out: the file to write; an existing file is replaced. Its parent folder
            is created. The data goes to ``<out>.partial`` first and is renamed
            at the end, so an interrupted run leaves no file at ``out`` (and
            removes the partial one unless the process is killed).
        seed: generator seed (any non-negative int); the same arguments give a
            byte-identical file.
        n_layers: number of blocks, instead of the shape's (quick tests at the
            real per-layer shapes).
        progress: a rich progress bar (bytes, on stderr) while writing.
        on_bytes: called with the number of tensor bytes just written, as they
            are written (after the progress bar); an exception it raises stops
            the run like an interrupt (no file is left).

    Returns:
        ``out``, whose size is :func:`expected_size` bytes.

    Raises:
        ModelError: unknown shape or quantisation, ``n_layers < 1``, a negative
            seed, or SmolLM2 (the tokenizer) cannot be resolved.
        OSError: the file cannot be written.
    """
    s, q, n = _shape_quant(shape, quant, n_layers)
    if seed < 0:
        raise ModelError(f"seed must be non-negative, got {seed}")
    tok, n_vocab = _tokenizer_entries()
    plan = _tensor_plan(s, q, n, n_vocab)
    entries = _metadata(s, q, n, seed, tok, n_vocab)
    out = Path(out)
    label, total = f"synthesizing {s.name} {q.name} ({n} layers)", sum(t.n_bytes for t in plan)
    ahead = ReadAhead(weight_chunks(plan, q, seed))
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

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

**Weights.** Every 2-D weight is stored in the chosen quantisation, blocks of
32 values along a row (ggml's ``ne0``), as llama.cpp's ``ggml-common.h``
defines them:

- Q4_0 (ggml type 2), 18 bytes: ``d`` (float16 scale), then 16 bytes of
  nibbles; byte j holds value j in its low nibble and value j + 16 in its high
  nibble; a value is ``(nibble - 8) * d``.
- Q8_0 (ggml type 8), 34 bytes: ``d`` (float16), then 32 ``int8`` quants; a
  value is ``q * d``.

Quants are uniform random bytes; ``|d|`` is chosen so that the weights'
root-mean-square is ``1 / sqrt(fan_in)`` (``fan_in`` = ``ne0``, the row
length), which keeps every projection's output at the scale of its input, so
activations stay finite through all layers and the logits have a standard
deviation of about 1. The sign of ``d`` is random per block (as in real
quantised files, where ``d`` takes the sign of the block's largest value), so
the nonzero mean of the uniform quants (-0.5) does not add up to a bias. Norm
weights are float32 ones.

Generation is deterministic: each tensor is drawn from its own generator,
``np.random.default_rng([seed, crc32(name)])``, so a tensor's bytes depend only
on the seed, its name, its shape and the quantisation (a model with
``n_layers=2`` has the same first two blocks as the full one).

Llama 3.2 rescales RoPE frequencies (``rope_scaling`` type ``llama3``); real
GGUF files carry that as a small ``rope_freqs.weight`` tensor (head_dim / 2
floats). It is left out here: it changes which frequencies a random model
uses, not the work or memory per token.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from homering.errors import ModelError
from homering.models import gguf_file as gfile
from homering.models.gguf_file import DEFAULT_ALIGNMENT, TensorSource, encode_string, tensor_nbytes, write_gguf

GGML_TYPE_F32 = 0
_CHUNK_BYTES = 16 << 20  # bytes generated at a time (peak memory is a small multiple of this)


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


@dataclass(frozen=True)
class Quant:
    """A block quantisation: ggml type, ``general.file_type``, block layout, quant statistics."""

    name: str
    ggml_type: int
    file_type: int  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
    block_bytes: int  # bytes of one block of 32 values: float16 scale + quants
    quant_rms: float  # root-mean-square of a uniform random quant value, in units of d


QK = 32  # values per block for both types
QUANTS: dict[str, Quant] = {
    # Q4_0: nibbles 0..15 minus 8, uniform: E[v^2] = (16^2 - 1) / 12 + 0.5^2 = 21.5
    "q4_0": Quant("q4_0", 2, 2, 2 + QK // 2, 21.5 ** 0.5),
    # Q8_0: int8 -128..127, uniform: E[v^2] = (256^2 - 1) / 12 + 0.5^2 = 5461.5
    "q8_0": Quant("q8_0", 8, 7, 2 + QK, 5461.5 ** 0.5),
}


@dataclass(frozen=True)
class _TensorPlan:
    name: str
    dims: tuple[int, ...]  # ggml order: ne0 (row length) first
    ggml_type: int
    n_bytes: int


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


def _tensor_plan(s: Shape, q: Quant, n_layers: int, n_vocab: int) -> list[_TensorPlan]:
    """Every tensor of the file, in file order (embedding, blocks in order, output norm and head)."""
    e, kv = s.n_embd, s.n_head_kv * s.head_dim

    def w(name: str, ne0: int, ne1: int) -> _TensorPlan:
        return _TensorPlan(name, (ne0, ne1), q.ggml_type, tensor_nbytes((ne0, ne1), q.ggml_type))

    def norm(name: str) -> _TensorPlan:
        return _TensorPlan(name, (e,), GGML_TYPE_F32, 4 * e)

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


def _header_bytes(entries: list[bytes], tensors: list[_TensorPlan]) -> int:
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


def _f16_bits(x: float) -> int:
    return int(np.array(x, dtype="<f2").view("<u2"))


def _quant_chunks(t: _TensorPlan, q: Quant, seed: int) -> Iterator[np.ndarray]:
    """The bytes of a random quantised tensor, at most ``_CHUNK_BYTES`` at a time."""
    fan_in = t.dims[0]
    d_bits = _f16_bits(1.0 / (fan_in ** 0.5) / q.quant_rms)
    lo, hi = d_bits & 0xFF, d_bits >> 8  # little-endian float16; sign bit is bit 7 of the high byte
    bitgen = np.random.default_rng([seed, zlib.crc32(t.name.encode())]).bit_generator
    n_blocks = t.n_bytes // q.block_bytes
    per_chunk = max(1, _CHUNK_BYTES // q.block_bytes)
    for first in range(0, n_blocks, per_chunk):
        nb = min(per_chunk, n_blocks - first)
        n = nb * q.block_bytes
        raw = bitgen.random_raw(-(-n // 8)).view(np.uint8)[:n].reshape(nb, q.block_bytes)
        raw[:, 0] = lo
        raw[:, 1] = (raw[:, 1] & 0x80) | hi  # random sign, fixed magnitude
        yield raw


def _norm_chunks(t: _TensorPlan) -> Iterator[bytes]:
    yield np.ones(t.dims, dtype="<f4").tobytes()


def _all_chunks(plan: list[_TensorPlan], q: Quant, seed: int) -> Iterator:
    for t in plan:
        yield from (_norm_chunks(t) if t.ggml_type == GGML_TYPE_F32 else _quant_chunks(t, q, seed))


class _ReadAhead:
    """The items of an iterator, each made in a worker thread while the caller writes the previous one.

    Random generation and the file write both release the GIL, so they
    overlap (at most two chunks are alive at a time).
    """

    def __init__(self, it: Iterator):
        from concurrent.futures import ThreadPoolExecutor

        self._it = it
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="synth")
        self._next = self._pool.submit(next, it, None)

    def take(self, n_bytes: int) -> Iterator:
        """Items until ``n_bytes`` bytes have been taken (one tensor's worth)."""
        while n_bytes > 0:
            item = self._next.result()
            if item is None:
                return
            self._next = self._pool.submit(next, self._it, None)
            n_bytes -= memoryview(item).nbytes
            yield item

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def synthesize(shape: str, quant: str, out: Path, *, seed: int = 0, n_layers: int | None = None,
               progress: bool = True) -> Path:
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

    Returns:
        ``out``, whose size is :func:`expected_size` bytes.

    Raises:
        ModelError: unknown shape or quantisation, ``n_layers < 1``, a negative
            seed, or SmolLM2 (the tokenizer) cannot be resolved.
        OSError: the file cannot be written.
    """
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    s, q, n = _shape_quant(shape, quant, n_layers)
    if seed < 0:
        raise ModelError(f"seed must be non-negative, got {seed}")
    tok, n_vocab = _tokenizer_entries()
    plan = _tensor_plan(s, q, n, n_vocab)
    entries = _metadata(s, q, n, seed, tok, n_vocab)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    total = sum(t.n_bytes for t in plan)
    ahead = _ReadAhead(_all_chunks(plan, q, seed))
    sources = [TensorSource(t.name, t.dims, t.ggml_type, t.n_bytes, chunks=ahead.take(t.n_bytes)) for t in plan]
    try:
        with open(partial, "wb") as fh, Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=Console(stderr=True), disable=not progress, transient=True,
        ) as bar:
            task = bar.add_task(f"synthesizing {s.name} {q.name} ({n} layers)", total=total)
            write_gguf(fh, entries, sources, DEFAULT_ALIGNMENT, on_bytes=lambda k: bar.advance(task, k))
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        ahead.close()
    return out

"""Random-weight GGUF models with the shapes of real Llama 3, Qwen2.5, Qwen3, Qwen3-MoE, Phi-3 and Gemma 2 models.

``homering models synth`` (and the registry's synthetic names such as
``llama3.2-3b-q4_0`` or ``qwen2.5-32b-q4_k_m``) write a GGUF file that
llama.cpp loads and runs like the real model: the same architecture
(``llama``, ``qwen2``, ``qwen3``, ``qwen3moe``, ``phi3``, ``gemma2``), hyper-parameters, tensor names, shapes and
quantisation, hence the same file size (up to the Llama shapes' vocabulary,
see below), memory use and decode speed, but random weights. It is meant for
benchmarks, where only speed and memory matter, without a multi-gigabyte
download.

Shapes (checked against the Hugging Face ``config.json`` of each model, as
mirrored in public copies of ``meta-llama/Meta-Llama-3-8B``,
``meta-llama/Llama-3.2-3B``, ``meta-llama/Llama-3.2-1B``, ``Qwen/QwQ-32B`` and
``Qwen/Qwen2.5-0.5B-Instruct``, ``Qwen/Qwen3-0.6B``, ``Qwen/Qwen3-30B-A3B``,
``microsoft/Phi-3-mini-4k-instruct``, ``google/gemma-2-2b``; per-architecture tensors and keys in
:mod:`homering.models.synth_shapes`):

============  =====  ======  ======  =====  =====  ==  =======  =====  ======  ======
shape         arch   layers  n_embd  n_ff   heads  kv  context  theta  vocab   output
============  =====  ======  ======  =====  =====  ==  =======  =====  ======  ======
llama3-8b     llama  32      4096    14336  32     8   8192     5e5    49152   untied
llama3.2-3b   llama  28      3072    8192   24     8   131072   5e5    49152   tied
llama3.2-1b   llama  16      2048    8192   32     8   131072   5e5    49152   tied
qwen2.5-32b   qwen2  64      5120    27648  40     8   40960    1e6    152064  untied
qwen2.5-0.5b  qwen2  24      896     4864   14     2   32768    1e6    151936  tied
qwen3-0.6b    qwen3  28      1024    3072   16     8   40960    1e6    151936  tied
phi3-mini     phi3   32      3072    8192   32     32  4096     1e4    32064   untied
gemma2-2b     gemma2 26      2304    9216   8      4   8192     1e4    256000  tied
============  =====  ======  ======  =====  =====  ==  =======  =====  ======  ======

Mixture-of-experts shapes (arch ``qwen3moe``, head size 128, per-head Q/K norms, untied head, vocabulary
151936, no shared experts):

=============  ======  ======  =====  ==  =======  ====  =====  =============================
shape          layers  n_embd  heads  kv  experts  used  n_ff   note
=============  ======  ======  =====  ==  =======  ====  =====  =============================
qwen3-30b-a3b  48      2048    32     4   128      8     768    Qwen3-30B-A3B (about 18 GB at q4_k_m)
qwen3moe-tiny  6       1024    16     4   8        2     768    reduced, for equivalence tests
=============  ======  ======  =====  ==  =======  ====  =====  =============================

Qwen3 and Gemma 2 have a head size of their own (128 and 256) written as
``attention.key_length``/``value_length``; Gemma 2 slides a 4096-token window on
its even layers and soft-caps attention (50) and final (30) logits; Phi-3 fuses
Q/K/V into ``attn_qkv`` and gate/up into ``ffn_up``. The MoE router
``ffn_gate_inp`` is float32 (as llama.cpp keeps it) with random normal weights,
so tokens route almost uniformly over the experts (real models are skewed).

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
from pathlib import Path
from typing import BinaryIO

from homering.errors import ModelError
from homering.models import gguf_file as gfile
from homering.models.gguf_file import DEFAULT_ALIGNMENT, TensorSource, encode_string, write_gguf
from homering.models.random_weights import QUANTS, Quant, ReadAhead, TensorPlan, weight_chunks
from homering.models.synth_shapes import SHAPES, Shape, arch_metadata, tensor_plan
from homering.models.synth_tokenizer import tokenizer_entries

__all__ = ["QUANTS", "SHAPES", "Quant", "Shape", "expected_size", "synthesize", "tensor_bytes"]


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


def tensor_bytes(shape: str, quant: str, n_layers: int | None = None, n_vocab: int | None = None) -> int:
    """Bytes of tensor data (without the header and padding) of a synthetic model.

    Needs no tokenizer file; ``n_vocab`` defaults to the shape's real
    vocabulary, or SmolLM2's 49152 for the Llama shapes.
    """
    s, q, n = _shape_quant(shape, quant, n_layers)
    return sum(t.n_bytes for t in tensor_plan(s, q, n, n_vocab or s.n_vocab or SMOLLM2_VOCAB))


def _metadata(
    s: Shape, q: Quant, n_layers: int, seed: int, tok_entries: list[bytes], n_vocab: int, sliding_window: int | None
) -> list[bytes]:
    enc, U32, STR = gfile.encode_field, gfile.UINT32, gfile.STRING
    # llama.cpp looks up Phi-3's own special tokens (absent from SmolLM2's tokenizer) in any model whose name
    # contains "phi3" or "phi-3" (llama-vocab.cpp, per-token attributes): the name spells it apart
    name = s.name.replace("phi3", "phi 3")
    return [
        enc("general.architecture", STR, s.arch),
        enc("general.type", STR, "model"),
        enc("general.name", STR, f"synthetic {name} {q.name} (random weights)"),
        enc("general.file_type", U32, q.file_type),
        enc("general.quantization_version", U32, 2),
        enc("general.alignment", U32, DEFAULT_ALIGNMENT),
        *arch_metadata(s, n_layers, n_vocab, sliding_window=sliding_window),
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
    tensors = tensor_plan(s, q, n, vocab)
    entries = _metadata(s, q, n, 0, tok, vocab, None)
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
    sliding_window: int | None = None,
) -> Path:
    """Write a random-weight GGUF with a real model's shape; return ``out``.

    Args:
        shape: a key of :data:`SHAPES` (``llama3-8b``, ``qwen2.5-32b``, ``qwen3-30b-a3b``, ``gemma2-2b`` …).
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
        sliding_window: the sliding-window size in tokens instead of the shape's (tests: Gemma 2's 4096).

    Returns:
        ``out``, whose size is :func:`expected_size` bytes.

    Raises:
        ModelError: bad shape, quantisation, ``n_layers``, seed or ``n_vocab``, or no SmolLM2 (the tokenizer).
        OSError: the file cannot be written.
    """
    s, q, n = _shape_quant(shape, quant, n_layers)
    if seed < 0:
        raise ModelError(f"seed must be non-negative, got {seed}")
    tok, vocab = tokenizer_entries(n_vocab or s.n_vocab)
    plan = tensor_plan(s, q, n, vocab)
    entries = _metadata(s, q, n, seed, tok, vocab, sliding_window)
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

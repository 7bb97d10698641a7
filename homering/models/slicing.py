"""Slice a GGUF model into standalone layer-window files.

A layer window [a, b) of a model with L blocks becomes a GGUF of its own that
llama.cpp loads like any model (design.md, facts 1 and 4):

- blocks ``blk.a … blk.(b-1)`` are renamed ``blk.0 … blk.(b-a-1)`` and
  ``<arch>.block_count`` is set to ``b - a``;
- per-layer metadata arrays (length L) are sliced the same way; sliding-window
  attention flags are always written as an explicit bool array
  ``<arch>.attention.sliding_window_pattern`` because llama.cpp's default
  pattern is computed from the layer index *inside* the file;
- the role decides what else is kept:

  ========  ===============================  ===============================
  role      tensors besides the blocks       tokenizer
  ========  ===============================  ===============================
  whole     the original file is used as is  kept
  first     ``token_embd``, ``output_norm``  ``none``, vocab_size n_vocab
  middle    dummy 1 × n_embd ``token_embd``  ``none``, vocab_size 1
  last      everything (``output`` or tied   kept (logits come out)
            ``token_embd``, ``output_norm``)
  ========  ===============================  ===============================

A first window takes token ids but never tokenizes: llama.cpp's ``none`` vocabulary with the model's
vocab_size keeps the ids valid (``llama_batch_allocr`` checks them against it) at 40 bytes per token,
instead of the whole tokenizer (28 MiB of anonymous memory for a 152k-token vocabulary: the first device
of PRIMA.CPP's cluster has 2.4 GiB, and 6% of it is 147 MiB).

Windows are cached under ``<home>/windows/<fingerprint>/`` by model identity,
window and role; a second request for the same window reuses the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from homering import paths
from homering.errors import ModelError
from homering.models import gguf_file as gfile
from homering.models.filehash import HashingWriter, drop_written, remember
from homering.models.gguf_file import GGUFFile, TensorSource, read_gguf, write_gguf
from homering.models.gguf_info import block_index, fingerprint
from homering.models.support import UnsupportedModel, split_problem

GGML_TYPE_F32 = 0


class Role(str, Enum):
    """What a layer window does besides its layers."""

    WHOLE = "whole"  # tokens in, logits out: the unsplit model
    FIRST = "first"  # tokens in, hidden states out
    MIDDLE = "middle"  # hidden states in, hidden states out
    LAST = "last"  # hidden states in, logits out

    @classmethod
    def for_range(cls, start: int, end: int, n_layers: int) -> Role:
        """The role of window [start, end) in a model of ``n_layers`` blocks."""
        first, last = start == 0, end == n_layers
        if first and last:
            return cls.WHOLE
        if first:
            return cls.FIRST
        if last:
            return cls.LAST
        return cls.MIDDLE

    @property
    def takes_tokens(self) -> bool:
        return self in (Role.WHOLE, Role.FIRST)

    @property
    def gives_logits(self) -> bool:
        return self in (Role.WHOLE, Role.LAST)


# Default sliding-window patterns of llama.cpp architectures that interleave
# sliding and global attention when the file gives only an integer or nothing
# (llama.cpp: load_swa_pattern(ml, n_pattern, dense_first) per model).
SWA_DEFAULT_PATTERN: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "llama4": (4, False),
    "gpt-oss": (2, False),
}


ZERO_WINDOW_TURNS_SWA_OFF = frozenset({"gemma3"})
"""Architectures whose loader turns sliding-window attention off when ``attention.sliding_window`` is 0
(gemma3.cpp: ``found_swa && n_swa > 0``). Others keep it (gemma2.cpp always builds an interleaved-SWA
cache): a window of only global layers gets the all-false flag array instead."""


def swa_flags(n_pattern: int, dense_first: bool, n_layers: int) -> list[bool]:
    """Per-layer "uses sliding-window attention" flags, as llama.cpp's ``set_swa_pattern``."""
    if n_pattern == 0:
        return [True] * n_layers
    if dense_first:
        return [il % n_pattern != 0 for il in range(n_layers)]
    return [il % n_pattern < n_pattern - 1 for il in range(n_layers)]


@dataclass(frozen=True)
class WindowSpec:
    """A layer window of a model: blocks [start, end) in the given role."""

    start: int
    end: int
    role: Role

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"bad layer window [{self.start}, {self.end})")

    @property
    def n_layers(self) -> int:
        return self.end - self.start

    def label(self) -> str:
        return f"{self.start}-{self.end}-{self.role.value}"


# Version of what a window file holds; a change re-slices cached windows. 2: a window made only of
# global-attention layers has no sliding window (format 1 files of such windows abort llama.cpp).
# 3: first windows have the ``none`` vocabulary.
SLICE_FORMAT = 3


def window_path(model_path: Path, spec: WindowSpec, model_fp: str | None = None) -> Path:
    """Cache location of a window file (does not create it)."""
    fp = model_fp or fingerprint(model_path)
    return paths.windows_dir() / fp / f"{spec.label()}.f{SLICE_FORMAT}.gguf"


def slice_window(
    model_path: str | os.PathLike[str],
    spec: WindowSpec,
    *,
    out: Path | None = None,
    progress: bool = True,
    model_fp: str | None = None,
) -> Path:
    """Write (or reuse) the standalone GGUF for one layer window.

    Args:
        model_path: the full model's GGUF.
        spec: the window and its role. ``Role.WHOLE`` returns ``model_path`` itself.
        out: explicit output path; default is the window cache.
        progress: show a rich progress bar for windows over 32 MB.
        model_fp: the model's fingerprint, when the caller already knows it.

    Returns:
        The window's path. The file appears atomically (written to a
        temporary name, then renamed), so concurrent agents slicing the same
        model never see half a file. Its SHA-256 is computed while writing and
        remembered beside it, and its pages leave the page cache
        (:mod:`homering.models.filehash`).

    Raises:
        ModelError: bad model file, or a window outside the model's layers.
        UnsupportedModel: an architecture homering cannot split safely (:mod:`homering.models.support`).
    """
    model_path = Path(model_path)
    if spec.role is Role.WHOLE:
        return model_path
    target = out or window_path(model_path, spec, model_fp)
    if target.exists():
        return target
    gf = read_gguf(model_path)
    problem = split_problem(gf)
    if problem:
        raise UnsupportedModel(problem)
    arch = gf.arch
    n_layers = int(gf.get(f"{arch}.block_count") or 0)
    if spec.end > n_layers:
        raise ModelError(f"window [{spec.start}, {spec.end}) is outside the model's {n_layers} layers")
    entries = _metadata_entries(gf, arch, n_layers, spec)
    tensors = _select_tensors(gf, spec, int(gf.get(f"{arch}.embedding_length")))

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        digest = _write_window(tmp, entries, tensors, gf.alignment, spec, progress=progress)
        os.replace(tmp, target)
        remember(target, digest)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _write_window(
    path: Path, entries: list[bytes], tensors: list[TensorSource], alignment: int, spec: WindowSpec, *, progress: bool
) -> str:
    """Write a window file at ``path`` (a progress bar over 32 MB) and drop it from the page cache; its SHA-256."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    total = sum(t.n_bytes for t in tensors)
    show = progress and total > (32 << 20)
    with (
        open(path, "wb") as fh,
        Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), disable=not show, transient=True
        ) as bar,
    ):
        task = bar.add_task(f"slicing layers {spec.start}-{spec.end} ({spec.role.value})", total=total)
        hashing = HashingWriter(fh)
        write_gguf(hashing, entries, tensors, alignment, on_bytes=lambda n: bar.advance(task, n))
        drop_written(fh)  # hashed already: no page of it stays cached (see homering.models.filehash)
    return hashing.sha256.hexdigest()


def _metadata_entries(gf: GGUFFile, arch: str, n_layers: int, spec: WindowSpec) -> list[bytes]:
    """Encoded metadata of the window: copied verbatim except what the window changes."""
    vocab_free = spec.role in (Role.FIRST, Role.MIDDLE)
    swa_replaced, swa_entries = _swa_entries(gf, arch, n_layers, spec)
    replaced = {f"{arch}.block_count"} | swa_replaced
    if vocab_free:
        replaced |= {"tokenizer.ggml.model", f"{arch}.vocab_size"}
    entries = []
    for key, f in gf.fields.items():
        if key in replaced or key.startswith("homering.") or (vocab_free and key.startswith("tokenizer.")):
            continue
        if (
            f.vtype == gfile.ARRAY
            and f.sub_type != gfile.STRING
            and f.length == n_layers
            and key.startswith(f"{arch}.")
        ):
            # a per-layer array moves with its layers
            entries.append(gfile.encode_field(key, f.vtype, f.value[spec.start : spec.end], f.sub_type))
        else:
            entries.append(f.raw)
    entries.append(gfile.encode_field(f"{arch}.block_count", gfile.UINT32, spec.n_layers))
    entries += swa_entries
    if vocab_free:
        entries.append(gfile.encode_field("tokenizer.ggml.model", gfile.STRING, "none"))
        n_vocab = next(t.dims[1] for t in gf.tensors if t.name == "token_embd.weight") if spec.role is Role.FIRST else 1
        entries.append(gfile.encode_field(f"{arch}.vocab_size", gfile.UINT32, n_vocab))
    entries.append(gfile.encode_field("homering.window.role", gfile.STRING, spec.role.value))
    entries.append(gfile.encode_field("homering.window.start", gfile.UINT32, spec.start))
    entries.append(gfile.encode_field("homering.window.end", gfile.UINT32, spec.end))
    return entries


UNBOUNDED_WINDOW = 1 << 20
"""A sliding window no sequence reaches (tokens): a sliding layer with it attends like a global one. Small
enough that llama.cpp's SWA cache size (``n_swa · n_seq_max + n_ubatch``, uint32) cannot overflow."""


def _swa_entries(gf: GGUFFile, arch: str, n_layers: int, spec: WindowSpec) -> tuple[set[str], list[bytes]]:
    """The sliding-window keys the window replaces and their new entries.

    The flags of the window's layers are written as an explicit bool array (llama.cpp's default pattern
    counts from the file's first layer). A window of only global-attention layers cannot say so: llama.cpp
    builds an interleaved-SWA cache for any model with a sliding window and asserts that some layer uses it.
    gemma3 then gets a window size of 0 (its loader turns SWA off); gemma2 (which always builds that cache)
    gets every layer flagged sliding with :data:`UNBOUNDED_WINDOW`, which masks nothing, so each attends
    globally, as in the whole model. That needs the sliding layers' RoPE and head sizes to equal the global
    ones: a file with ``*_swa`` keys is refused there.

    Raises:
        ModelError: a gemma2 window of only global layers in a model with its own SWA RoPE or head sizes.
    """
    pattern_key = f"{arch}.attention.sliding_window_pattern"
    window_key = f"{arch}.attention.sliding_window"
    flags = layer_swa_flags(gf, arch, n_layers)
    if flags is None:
        return {pattern_key}, []
    flags = flags[spec.start : spec.end]
    if any(flags):
        return {pattern_key}, [gfile.encode_field(pattern_key, gfile.ARRAY, flags, gfile.BOOL)]
    if arch in ZERO_WINDOW_TURNS_SWA_OFF:
        return {pattern_key, window_key}, [gfile.encode_field(window_key, gfile.UINT32, 0)]
    own = [k for k in gf.fields if k.startswith(f"{arch}.") and k.endswith("_swa")]
    if own:
        raise ModelError(
            f"layers {spec.start}-{spec.end} of this {arch} model are all global-attention layers, which a window "
            f"can only express as unbounded sliding ones, but the model has {own[0]}: cut elsewhere"
        )
    return {pattern_key, window_key}, [
        gfile.encode_field(window_key, gfile.UINT32, UNBOUNDED_WINDOW),
        gfile.encode_field(pattern_key, gfile.ARRAY, [True] * spec.n_layers, gfile.BOOL),
    ]


def layer_swa_flags(gf: GGUFFile, arch: str, n_layers: int) -> list[bool] | None:
    """The full model's per-layer sliding-window flags, or None if it has no SWA."""
    pattern = gf.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return [bool(x) for x in pattern]
    if not gf.get(f"{arch}.attention.sliding_window"):
        return None
    n_pattern, dense_first = SWA_DEFAULT_PATTERN.get(arch, (None, False))
    if pattern is not None:
        n_pattern = int(pattern)
    if n_pattern is None:
        return None
    return swa_flags(n_pattern, dense_first, n_layers)


def _select_tensors(gf: GGUFFile, spec: WindowSpec, n_embd: int) -> list[TensorSource]:
    """Every tensor the window file holds, in file order, with where its bytes come from."""
    out = []
    for t in gf.tensors:
        blk = block_index(t.name)
        name = t.name
        if blk is not None:
            if not spec.start <= blk < spec.end:
                continue
            name = f"blk.{blk - spec.start}." + t.name.split(".", 2)[2]
        elif spec.role is Role.MIDDLE and t.name.startswith(("token_embd.", "output.")):
            continue
        elif spec.role is Role.FIRST and t.name.startswith("output."):
            continue  # llama.cpp falls back to the (tied) token embedding; never computed here
        out.append(TensorSource(name, t.dims, t.ggml_type, t.n_bytes, gf.path, t.offset))
    if spec.role is Role.MIDDLE:
        dummy = np.zeros(n_embd, dtype=np.float32).tobytes()
        out.insert(0, TensorSource("token_embd.weight", (n_embd, 1), GGML_TYPE_F32, len(dummy), data=dummy))
    return out


def window_tensor_bytes(model_path: str | os.PathLike[str], start: int, end: int) -> int:
    """Bytes of the tensors of blocks [start, end) in the full model."""
    gf = read_gguf(model_path)
    return sum(t.n_bytes for t in gf.tensors if (b := block_index(t.name)) is not None and start <= b < end)

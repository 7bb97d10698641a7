"""How :meth:`~homering.engine.window.LayerWindow.forward_many` packs items into ``llama_batch`` es."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any

import numpy.typing as npt

from homering.models.gguf_file import read_gguf

# One run of one sequence's inputs for forward_many: (token ids or hidden states, first position, seq_id).
Item = tuple[npt.NDArray[Any], int, int]
# A piece of an item that fits one batch: (item index, offset in the item, n tokens).
Piece = tuple[int, int, int]


EXACT_BATCH = 7
"""The most tokens of a batch that holds a speculative verification (:data:`~homering.wire.FLAG_ROWS`): up
to 7 tokens a batch's logits are bitwise those of one-token decoding on SmolLM2 and Gemma-3-270M (measured;
from 8 tokens on, llama.cpp's CPU kernels for Gemma-3 round differently), so a verified greedy answer stays
the unsplit model's token for token."""


FLOAT_TYPES = frozenset({0, 1, 30})
"""ggml types F32, F16, BF16: in a llama.cpp built with llamafile's tinyBLAS (``GGML_LLAMAFILE``, on by
default), weight matrices of these types go through tinyBLAS for batches of 2+ tokens and through ggml's dot
products for one token (ggml-cpu.c, sgemm.cpp: ``llamafile_sgemm`` declines ``n < 2``), which round
differently (measured on SmolLM2 dequantized to F16: 0.02 apart in the logits from 2 tokens on)."""


@functools.cache
def tinyblas_batches() -> bool:
    """Whether the loaded llama.cpp sends batches of 2+ tokens through llamafile's tinyBLAS
    (``LLAMAFILE = 1`` in ``llama_print_system_info``). ``make install`` builds llama-cpp-python without it,
    so that every batch computes each dot product as one-token decoding does."""
    import llama_cpp

    return "LLAMAFILE = 1" in llama_cpp.llama_print_system_info().decode(errors="replace")


def exact_batch(path: Path) -> int:
    """The largest verification batch whose outputs are bitwise those of one-token decoding for this GGUF
    file: :data:`EXACT_BATCH`, or 1 when a weight matrix is F32/F16/BF16 (:data:`FLOAT_TYPES`) and llama.cpp
    uses tinyBLAS (:func:`tinyblas_batches`). The quantized types measured (Q4_1, Q8_0, Q4_K, Q6_K) give the
    same floats for 1 … 7 tokens either way.

    Raises:
        ModelError: not a readable GGUF file.
    """
    floats = any(len(t.dims) >= 2 and t.ggml_type in FLOAT_TYPES for t in read_gguf(path).tensors)
    return 1 if floats and tinyblas_batches() else EXACT_BATCH


def pack_batches(
    arrays: list[npt.NDArray[Any]], n_batch: int, rows: list[bool] | None = None, exact: int = EXACT_BATCH
) -> list[list[Piece]]:
    """The items' tokens in order, cut into pieces (an item longer than ``n_batch`` is split) and packed
    into batches of at most ``n_batch`` tokens. Items flagged in ``rows`` (verifications) come first, in
    batches of their own of at most ``exact`` tokens (1: token by token): a verification refills the KV
    cells its sequence's rejected drafts left (llama.cpp's ``seq_rm`` moves the cache's search head to the
    first freed cell), so another sequence's token decoded before it would take a cell ahead of that
    sequence's own latest cells, and its logits would change (a failing concurrent Gemma run, k = 2)."""
    flagged = rows or [False] * len(arrays)
    batches: list[list[Piece]] = []
    for want, cap in ((True, min(n_batch, exact)), (False, n_batch)):
        batches.append([])
        total = 0
        for i, arr in enumerate(arrays):
            if flagged[i] != want:
                continue
            for off in range(0, arr.shape[0], cap):
                n = min(cap, arr.shape[0] - off)
                if total + n > cap:
                    batches.append([])
                    total = 0
                batches[-1].append((i, off, n))
                total += n
    return [b for b in batches if b]


def fill_batch(
    b: Any,  # a llama_batch (llama-cpp-python types its pointers as arrays)
    group: list[Piece],
    arrays: list[npt.NDArray[Any]],
    items: list[Item],
    *,
    row_floats: int,
    every_row: bool,
    rows: list[bool],
) -> list[tuple[int, int, int, int, bool]]:
    """Copy ``group``'s inputs, positions and sequences into the batch ``b``: token ids (``row_floats`` = 0)
    or hidden-state rows of ``row_floats`` floats. Every row is an output when ``every_row`` or the item's
    ``rows``, else each finished item's last one. Returns (item, offset in the item, first batch row, n,
    whether the item ends here) of every piece."""
    row = 0
    placed = []
    for i, off, n in group:
        chunk = arrays[i][off : off + n]
        pos, seq_id = items[i][1] + off, items[i][2]
        if row_floats:
            ctypes.memmove(ctypes.addressof(b.embd.contents) + row * row_floats * 4, chunk.ctypes.data, chunk.nbytes)
        else:
            ctypes.memmove(ctypes.addressof(b.token.contents) + row * 4, chunk.ctypes.data, chunk.nbytes)
        is_last = off + n == arrays[i].shape[0]
        for j in range(n):
            b.pos[row + j] = pos + j
            b.n_seq_id[row + j] = 1
            b.seq_id[row + j][0] = seq_id
            b.logits[row + j] = every_row or rows[i] or (is_last and j == n - 1)
        placed.append((i, off, row, n, is_last))
        row += n
    return placed

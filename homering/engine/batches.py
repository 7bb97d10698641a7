"""How :meth:`~homering.engine.window.LayerWindow.forward_many` packs items into ``llama_batch`` es."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy.typing as npt

# One run of one sequence's inputs for forward_many: (token ids or hidden states, first position, seq_id).
Item = tuple[npt.NDArray[Any], int, int]
# A piece of an item that fits one batch: (item index, offset in the item, n tokens).
Piece = tuple[int, int, int]


EXACT_BATCH = 7
"""The most tokens of a batch that holds a speculative verification (:data:`~homering.wire.FLAG_ROWS`): up
to 7 tokens a batch's logits are bitwise those of one-token decoding on SmolLM2 and Gemma-3-270M (measured;
from 8 tokens on, llama.cpp's CPU kernels for Gemma-3 round differently), so a verified greedy answer stays
the unsplit model's token for token."""


def pack_batches(arrays: list[npt.NDArray[Any]], n_batch: int, rows: list[bool] | None = None) -> list[list[Piece]]:
    """The items' tokens in order, cut into pieces (an item longer than ``n_batch`` is split) and packed
    into batches of at most ``n_batch`` tokens. Items flagged in ``rows`` (verifications) come after the
    others, in batches of their own of at most :data:`EXACT_BATCH` tokens."""
    flagged = rows or [False] * len(arrays)
    batches: list[list[Piece]] = []
    for want, cap in ((False, n_batch), (True, min(n_batch, EXACT_BATCH))):
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
) -> list[tuple[int, int, int]]:
    """Copy ``group``'s inputs, positions and sequences into the batch ``b``: token ids (``row_floats`` = 0)
    or hidden-state rows of ``row_floats`` floats. Every row is an output when ``every_row`` or the item's
    ``rows``, else each finished item's last one. Returns (item, first batch row, n) of each finished
    item's last piece."""
    row = 0
    last_rows = []
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
        if is_last:
            last_rows.append((i, row, n))
        row += n
    return last_rows

"""Reading a decode's outputs row by row: logits, or per-token embeddings (the output norm's result, before the
LM head).

llama.cpp computes them when the context's embeddings flag is on (``llama_set_embeddings``, which may be
toggled between decodes; the output buffer keeps the logits too) and the context pools nothing (pooling type
NONE, what generative models have): ``llama_get_embeddings_ith`` then gives each output row's
(n_embd,) float32 vector. :meth:`~homering.engine.window.LayerWindow.forward_many` uses them for
``embed`` items.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from homering.errors import HomeringError

Floats = npt.NDArray[np.float32]


class EmbeddingError(HomeringError):
    """The context cannot give per-token embeddings (a model with a pooling layer of its own)."""


@contextlib.contextmanager
def embedding_mode(ctx: Any, on: bool, name: str) -> Iterator[None]:
    """Turn the context's embeddings on (``on``) for the decodes inside, then off again.

    Raises:
        EmbeddingError: ``on``, and the context pools (an embedding model: its pooled vector is not this).
    """
    if on:
        pooling = llama_cpp.llama_pooling_type(ctx)
        if pooling not in (llama_cpp.LLAMA_POOLING_TYPE_NONE, llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED):
            raise EmbeddingError(f"{name} has a pooling layer of its own (type {pooling}): not supported")
    llama_cpp.llama_set_embeddings(ctx, on)
    try:
        yield
    finally:
        llama_cpp.llama_set_embeddings(ctx, False)


def read_rows(
    ctx: Any, out: list[Floats | None], i: int, shape: tuple[int, int], pieces: tuple[int, int, int], *, embed: bool
) -> None:
    """Copy output rows ``row`` … ``row + n - 1`` of the last decode (``pieces`` = (off, row, n)) into rows
    ``off`` … of item ``i``'s ``shape`` (n_tokens, n_vocab) logits, or (``embed``) (n_tokens, n_embd)
    embeddings, ``out[i]`` (made on its first piece).

    Raises:
        EmbeddingError: llama.cpp has no such row (not an output, or embeddings off).
    """
    buf = out[i]
    if buf is None:
        buf = out[i] = np.empty(shape, dtype=np.float32)
    get = llama_cpp.llama_get_embeddings_ith if embed else llama_cpp.llama_get_logits_ith
    off, row, n = pieces
    for j in range(n):
        ptr = get(ctx, row + j)
        if not ptr:
            raise EmbeddingError(f"llama.cpp gave no output for batch row {row + j}")
        buf[off + j] = np.ctypeslib.as_array(ptr, shape=(shape[1],))

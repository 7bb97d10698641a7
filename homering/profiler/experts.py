"""How much of a mixture-of-experts layer a decoded token reads from disk: measured, never assumed.

A MoE layer holds ``n_expert`` experts and routes each token to ``k`` of them
(Qwen3-30B-A3B: 8 of 128). A device that streams its layers from disk (the
planner's *stream* and *overflow* modes) then reads per token only the pages
of the experts it routes to, plus attention and router, plus whatever the
kernel's fault read-around pulls in beside them. That share depends on the
routing (random weights route almost uniformly, trained models are skewed) and
on the kernel, so it is measured:

1. a probe window of the model's own layers (role ``middle``) is loaded and
   decodes a first token (buffers allocated);
2. for each of :data:`READ_SHARE_TOKENS` tokens: the window's pages are dropped
   from the page cache (:meth:`~homering.engine.pages.WindowPages.release`), one
   token is decoded at the next position with a random hidden state, and
   ``mincore`` tells which pages of the file came back
   (:func:`~homering.engine.pages.resident_pages`);
3. the share is the mean over those tokens of the bytes of the layers' tensors
   whose pages were read, over the layers' tensor bytes.

A dense layer reads all of itself (share about 1). The inputs are random
hidden states, whose routing is near uniform, as a random-weight model's: a
trained model on real text routes more unevenly, so several tokens in a row
share experts and the page cache serves them; the measured figure is then an
upper bound of what a real conversation reads.
"""

from __future__ import annotations

import logging
import mmap
from pathlib import Path

import numpy as np

from homering.engine.pages import WindowPages, madvise, mappings_of, resident_pages
from homering.engine.window import LayerWindow
from homering.models.gguf_file import read_gguf
from homering.models.gguf_info import ModelInfo, block_index
from homering.models.slicing import slice_window
from homering.profiler.compute import WindowSource, probe_layers, probe_specs

log = logging.getLogger(__name__)

READ_SHARE_TOKENS = 8
"""Decoded tokens the share is averaged over."""
MADV_RANDOM = 1  # Linux <asm-generic/mman-common.h>
READ_SHARE_N_CTX = 64
"""KV cache of the probe window, tokens."""


def _layer_pages(path: Path) -> np.ndarray:
    """A bool per page of ``path``: True where a block tensor's bytes lie."""
    gf = read_gguf(path)
    page = mmap.PAGESIZE
    mask = np.zeros(-(-path.stat().st_size // page), dtype=bool)
    for t in gf.tensors:
        if block_index(t.name) is not None and t.n_bytes:
            mask[t.offset // page : -(-(t.offset + t.n_bytes) // page)] = True
    return mask


def measure_read_share(
    window: str | Path, *, threads: int, tokens: int = READ_SHARE_TOKENS, random_access: bool = False
) -> float | None:
    """The share of a window's layer bytes one decoded token reads from disk, in [0, 1] (see the module).

    Args:
        window: a ``middle`` window file of the model (hidden states in and out).
        threads: llama.cpp threads.
        tokens: decodes averaged over (>= 1).
        random_access: advise the kernel that the mapping is read at random (``MADV_RANDOM``: no fault
            read-around), so the share is what the routing alone reads. Off by default: the agents' windows
            keep the kernel's read-around (8 MiB on this project's test machine, more than one expert
            matrix of Qwen3-30B-A3B), and the planner needs what they really read.

    Returns:
        The mean share, or None where the page cache cannot be inspected or dropped (not Linux).

    Raises:
        HomeringError: llama.cpp cannot load the window or decode fails.
    """
    path = Path(window)
    if not WindowPages.supported or tokens < 1:
        return None
    layers = _layer_pages(path)
    total = int(layers.sum())
    if not total:
        return None
    shares = []
    rng = np.random.default_rng(0)
    with LayerWindow(
        path, takes_tokens=False, gives_logits=False, n_ctx=READ_SHARE_N_CTX, n_batch=1, n_threads=threads
    ) as w:
        w.forward(rng.standard_normal((1, w.n_embd), dtype=np.float32), 0)
        pages = WindowPages(path)
        if random_access:
            for start, end, _ in mappings_of(path):
                madvise(start, end - start, MADV_RANDOM)
        try:
            for pos in range(1, tokens + 1):
                pages.release()
                w.forward(rng.standard_normal((1, w.n_embd), dtype=np.float32), pos)
                read = resident_pages(path)
                shares.append(float((read[: len(layers)] & layers).sum()) / total)
        finally:
            pages.close()
    share = float(np.mean(shares))
    log.info("a decoded token read %.1f%% of the probe window's layer bytes (%d tokens)", 100 * share, tokens)
    return share


def measure_model_read_share(info: ModelInfo, *, threads: int, windows: WindowSource | None = None) -> float | None:
    """:func:`measure_read_share` on the model's middle probe window (the one
    :func:`~homering.profiler.compute.measure_compute` times, so a controller can serve it to an agent
    without the model: ``windows``); None where it cannot be measured.

    Raises:
        HomeringError: llama.cpp cannot load the window; ModelError: it cannot be sliced.
    """
    spec = probe_specs(info, probe_layers(info), None)[0]
    if windows is not None:
        path = windows(spec)
    else:
        path = slice_window(info.path, spec, progress=False, model_fp=info.fingerprint)
    return measure_read_share(path, threads=threads)

"""How much of a mixture-of-experts layer a decoded token reads from disk: measured, never assumed.

A MoE layer holds ``n_expert`` experts and routes each token to ``k`` of them
(Qwen3-30B-A3B: 8 of 128). A device that streams or overflows its layers
then needs per token only the pages of the experts it routes to, plus
attention and router. How much of that comes from disk depends on the
routing (which experts, and how often the next tokens come back to them) and
on the kernel (its fault read-around reads pages beside a routed expert), so
two figures are measured on a probe window of the model's own first layers,
fed real text (:data:`ROUTING_TEXT`, so the routing is the model's own):

* the **hot share** ``u``: the union of the layer pages a stream of tokens
  touches (a prompt of :data:`HOT_PROMPT_TOKENS` tokens, then
  :data:`HOT_DECODE_TOKENS` decoded one at a time), over the layers' bytes,
  with the kernel's read-around off (``MADV_RANDOM``: only what the routing
  touches). Uniform routing gives about 1; a model whose tokens route to a
  few experts gives much less, and a page cache that holds those bytes serves
  every later token;
* the **novelty share** ``ν``: then, with the read-around on as the agents
  run, for each of :data:`NOVEL_TOKENS` further tokens (nothing dropped), the
  pages it brought into the page cache over the layer pages that were not
  there before it: how much of what a device does not cache a token reads
  (an expert the stream had not used, and the read-around beside it);
* the **read share** ``r``: for each of :data:`READ_SHARE_TOKENS` further
  tokens, the window's pages are dropped from the page cache
  (:meth:`~homering.engine.pages.WindowPages.release`), one token is decoded,
  and ``mincore`` tells which pages came back
  (:func:`~homering.engine.pages.resident_pages`), read-around included, as
  the agents run: the bytes a token reads from a cold cache. Their decode
  time beyond a warm decode's (the novelty tokens', median) gives the **fault
  read speed** ``fault_gbps``: page faults on scattered experts read slower
  than a file read in order (measured: 2.3 GB/s against 5.4 on this
  project's test machine).

The planner (:mod:`homering.planner.model`) turns them into bytes read per
token. A dense layer gives ``u = r = 1``. The first layers of a model route
from the token embeddings, more evenly than deeper layers (on the synthetic
Qwen3-30B-A3B, 8 prompt tokens touch 25% of layer 0's experts and 6-15% of
the later layers'): the figures are an upper bound for the rest of the model.
A trained model's routing on a user's text is what it is; the profile
measures it on :data:`ROUTING_TEXT`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import mmap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from homering.engine.pages import WindowPages, madvise, mappings_of, resident_pages
from homering.engine.tokenizer import Tokenizer
from homering.engine.window import LayerWindow
from homering.models.gguf_file import read_gguf
from homering.models.gguf_info import ModelInfo, block_index
from homering.models.slicing import slice_window
from homering.profiler.compute import WindowSource, routing_probe_spec

log = logging.getLogger(__name__)

READ_SHARE_TOKENS = 8
"""Tokens decoded from a cold page cache, each: ``r`` is their mean."""
HOT_PROMPT_TOKENS = 32
"""Prompt tokens (one batch) before the decoded ones, all counted in ``u``."""
HOT_DECODE_TOKENS = 16
"""Tokens decoded one at a time after the prompt, counted in ``u``."""
NOVEL_TOKENS = 8
"""Tokens decoded after those, whose new pages give ``ν``."""
MADV_NORMAL, MADV_RANDOM = 0, 1  # Linux <asm-generic/mman-common.h>
READ_SHARE_N_CTX = 128
"""KV cache of the probe window, tokens (holds every probe token)."""
ROUTING_TEXT = (
    "The committee met on Tuesday to review the budget for the new library. After a long discussion about "
    "the costs of heating, staff and books, the members agreed to ask the city for a larger grant next "
    "year. Meanwhile, volunteers will repair the roof, paint the reading room and sort the donated novels, "
    "maps and old newspapers before the opening in March. Children from the local school have promised to "
    "draw posters for the event."
)
"""Plain English text whose tokens the routing probe feeds the model's first layers."""


@dataclass(frozen=True)
class Routing:
    """What a MoE window's decoded tokens need from disk (see the module): shares of its layer bytes.

    Attributes:
        read_share: ``r`` in (0, 1], the bytes one token reads from a cold page cache.
        hot_share: ``u`` in (0, 1], the union of the pages a stream of tokens touches.
        novel_share: ``ν`` in [0, 1], the share of the pages not in the page cache one more token reads.
        fault_gbps: the read speed of the cold decodes' page faults, GB/s: the bytes they read over the time
            they took beyond a warm decode (None when nothing was read or the difference was not positive).
    """

    read_share: float
    hot_share: float
    novel_share: float
    fault_gbps: float | None = None


def _layer_pages(path: Path) -> np.ndarray:
    """A bool per page of ``path``: True where a block tensor's bytes lie."""
    gf = read_gguf(path)
    page = mmap.PAGESIZE
    mask = np.zeros(-(-path.stat().st_size // page), dtype=bool)
    for t in gf.tensors:
        if block_index(t.name) is not None and t.n_bytes:
            mask[t.offset // page : -(-(t.offset + t.n_bytes) // page)] = True
    return mask


def _advise(path: Path, advice: int) -> None:
    for start, end, _ in mappings_of(path):
        madvise(start, end - start, advice)


def _stream_then_cold(
    w: LayerWindow,
    path: Path,
    layers: np.ndarray,
    inputs: Callable[[int, int], np.ndarray],
    tokens: int,
    random_access: bool,
) -> tuple[float, float, list[float], float | None]:
    """(u, ν, r of each cold decode, fault GB/s): the hot share of a stream of tokens from a cold cache
    (read-around off), the novelty share of the tokens after it, then the share each of ``tokens`` decodes
    reads from a cold cache (read-around on unless ``random_access``) and the speed it read at."""
    total = int(layers.sum())

    def resident() -> np.ndarray:
        return resident_pages(path)[: len(layers)] & layers

    at = itertools.count(1 + HOT_PROMPT_TOKENS)  # the next decode's position

    def step() -> float:
        pos, t0 = next(at), time.perf_counter()
        w.forward(inputs(pos, 1), pos)
        return time.perf_counter() - t0

    pages = WindowPages(path)
    try:
        _advise(path, MADV_RANDOM)
        pages.release()
        w.forward(inputs(1, HOT_PROMPT_TOKENS), 1)
        for _ in range(HOT_DECODE_TOKENS):
            step()
        before = resident()
        hot = float(before.sum()) / total
        if not random_access:
            _advise(path, MADV_NORMAL)
        novel, warm = [], []
        for _ in range(NOVEL_TOKENS):
            warm.append(step())
            now = resident()
            cold = total - int(before.sum())
            novel.append(float((now & ~before).sum()) / cold if cold else 0.0)
            before = now
        shares, faulting = [], 0.0
        for _ in range(tokens):
            pages.release()
            faulting += max(0.0, step() - float(np.median(warm)))
            shares.append(float(resident().sum()) / total)
    finally:
        pages.close()
    read = sum(shares) * total * mmap.PAGESIZE
    return hot, float(np.mean(novel)), shares, read / faulting / 1e9 if read and faulting > 0 else None


def measure_routing(
    window: str | Path,
    *,
    threads: int,
    token_ids: Sequence[int] | None = None,
    tokens: int = READ_SHARE_TOKENS,
    random_access: bool = False,
) -> Routing | None:
    """The hot, novelty and read shares of a window's layer bytes (see the module).

    Args:
        window: a window file of the model: a ``first`` window fed ``token_ids`` (real text, cycled), or a
            ``middle`` window fed random hidden states (``token_ids`` None; their routing is near uniform).
        threads: llama.cpp threads.
        tokens: cold-cache decodes ``r`` is averaged over (>= 1).
        random_access: measure ``r`` with the kernel's read-around off (``MADV_RANDOM``), so it is what the
            routing alone touches. Off by default: the agents' windows keep the read-around (8 MiB on this
            project's test machine, more than one expert matrix of Qwen3-30B-A3B), and the planner needs
            what they really read.

    Returns:
        The shares, or None where the page cache cannot be inspected or dropped (not Linux).

    Raises:
        HomeringError: llama.cpp cannot load the window or decode fails.
    """
    path = Path(window)
    if not WindowPages.supported or tokens < 1:
        return None
    layers = _layer_pages(path)
    if not layers.any():
        return None
    rng = np.random.default_rng(0)
    ids = list(token_ids or [])

    def inputs(pos: int, n: int) -> np.ndarray:
        if ids:
            return np.array([ids[(pos + i) % len(ids)] for i in range(n)], dtype=np.int32)
        return rng.standard_normal((n, w.n_embd), dtype=np.float32)

    with LayerWindow(
        path,
        takes_tokens=bool(ids),
        gives_logits=False,
        n_ctx=READ_SHARE_N_CTX,
        n_batch=HOT_PROMPT_TOKENS,
        n_threads=threads,
    ) as w:
        w.forward(inputs(0, 1), 0)  # buffers allocated
        hot, novel, shares, fault_gbps = _stream_then_cold(w, path, layers, inputs, tokens, random_access)
    r = float(np.mean(shares))
    log.info(
        "a stream of tokens touched %.1f%% of the probe window's layer bytes; the next read %.2f%% of what was "
        "not cached; a token read %.1f%% from a cold cache, at %s GB/s",
        100 * hot,
        100 * novel,
        100 * r,
        f"{fault_gbps:.2f}" if fault_gbps else "?",
    )
    return Routing(read_share=max(r, 1e-6), hot_share=max(hot, 1e-6), novel_share=novel, fault_gbps=fault_gbps)


@functools.lru_cache(maxsize=4)
def routing_tokens(model_path: str) -> tuple[int, ...]:
    """The token ids of :data:`ROUTING_TEXT` in the vocabulary of the whole model at ``model_path`` (windows
    that take tokens keep no tokenizer: :mod:`homering.models.slicing`), without special tokens.

    Raises:
        ModelError: llama.cpp cannot load the vocabulary.
    """
    tokenizer = Tokenizer(model_path)
    try:
        return tuple(tokenizer.tokenize(ROUTING_TEXT, add_special=False))
    finally:
        tokenizer.close()


def measure_model_routing(
    info: ModelInfo, *, threads: int, windows: WindowSource | None = None, token_ids: Sequence[int] | None = None
) -> Routing | None:
    """:func:`measure_routing` on the model's first layers fed :data:`ROUTING_TEXT`
    (:func:`~homering.profiler.compute.routing_probe_spec`; a controller serves that window to an agent
    without the model, ``windows``, and the text's ``token_ids`` with the model's facts; default: tokenized
    from ``info.path``); None where it cannot be measured (not Linux, or no token ids without the model).

    Raises:
        HomeringError: llama.cpp cannot load the window; ModelError: it cannot be sliced.
    """
    ids = list(token_ids or ())
    if not ids and info.path.is_file():
        ids = list(routing_tokens(str(info.path)))
    if not ids:
        log.warning("no token ids of the routing text: the MoE read share is not measured (r = u = 1)")
        return None
    spec = routing_probe_spec(info)
    if windows is not None:
        path = windows(spec)
    else:
        path = slice_window(info.path, spec, progress=False, model_fp=info.fingerprint)
    return measure_routing(path, threads=threads, token_ids=ids)

"""How much of a mixture-of-experts layer a decoded token reads from disk: measured, never assumed.

A MoE layer holds ``n_expert`` experts and routes each token to ``k`` of them
(Qwen3-30B-A3B: 8 of 128). A device that streams or overflows its layers
then needs per token only the pages of the experts it routes to, plus
attention and router. How much of that comes from disk depends on the
routing (which experts, and how often the next tokens come back to them) and
on the kernel (its fault read-around reads pages beside a routed expert), so
four figures are measured on a probe window of the model's own first layers,
fed real text (:data:`ROUTING_TEXT`, so the routing is the model's own):

* the **hot share** ``u``: the union of the layer pages a stream of tokens
  touches (a prompt of :data:`HOT_PROMPT_TOKENS` tokens, then
  :data:`HOT_DECODE_TOKENS` decoded one at a time), over the layers' bytes,
  with the kernel's read-around off (``MADV_RANDOM``: only what the routing
  touches). Uniform routing gives about 1; a model whose tokens route to a
  few experts gives much less, and a page cache that holds those bytes serves
  every later token;
* the **novelty share** ``ν``: then, mapped as the agents map an overflowing
  window (the expert tensors without read-around, each layer's routed experts
  prefetched once its router has chosen: :mod:`homering.engine.prefetch`; the
  rest with the kernel's read-around), for each of :data:`NOVEL_TOKENS`
  further tokens (nothing dropped), the pages it brought into the page cache
  over the layer pages that were not there before it: how much of what a
  device does not cache a token reads (the experts the stream had not used);
* the **read share** ``r``: for each of :data:`READ_SHARE_TOKENS` further
  tokens, the window's pages are dropped from the page cache
  (:meth:`~homering.engine.pages.WindowPages.release`), one token is decoded,
  and ``mincore`` tells which pages came back
  (:func:`~homering.engine.pages.resident_pages`), as the agents run: the
  bytes a token reads from a cold cache. Their decode time beyond a warm
  decode's (the novelty tokens', median) gives the **fault read speed**
  ``fault_gbps``: the disk reads scattered experts slower than a file in
  order.

Measured on the synthetic Qwen3-30B-A3B, whole model: ``u`` 21.6%, ``ν``
0.10% (1.3% with the kernel's read-around on the experts, which is why the
agents prefetch instead), ``r`` 18.8% (74% with read-around), read at 3.6
GB/s (1.8 with read-around; this disk reads a file in order at 5.4).

The planner (:mod:`homering.planner.model`) turns them into bytes read per
token. A dense layer gives ``u = r = 1``. The first layers of a model route
from the token embeddings, more evenly than deeper layers, so a probe of them
alone overstates the rest: the controller, which has the model, measures each
layer's ``u`` and ``ν`` on the whole model once (:func:`measure_layer_routing`,
as in a conversation: the text as a prompt, then the model's own greedy
tokens), and the plan takes those. A trained model's routing on a user's text
is what it is; the profile measures it on :data:`ROUTING_TEXT`.
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
from homering.engine.window import LayerWindow, WindowOutput
from homering.models.gguf_file import read_gguf
from homering.models.gguf_info import ModelInfo, block_index
from homering.models.slicing import slice_window
from homering.profiler.compute import WindowSource, routing_probe_spec

log = logging.getLogger(__name__)

Inputs = Callable[[int, int, "WindowOutput | None"], np.ndarray]
"""``inputs(pos, n, last)``: the next ``n`` inputs from position ``pos``, ``last`` the previous forward's output."""

READ_SHARE_TOKENS = 8
"""Tokens decoded from a cold page cache, each: ``r`` is their mean."""
HOT_PROMPT_TOKENS = 32
"""Prompt tokens (one batch) before the decoded ones, all counted in ``u``."""
HOT_DECODE_TOKENS = 16
"""Tokens decoded one at a time after the prompt, counted in ``u``."""
NOVEL_TOKENS = 8
"""Tokens decoded after those, whose new pages give ``ν``."""
LAYER_NOVEL_TOKENS = 32
"""The same on the whole model (:func:`measure_layer_routing`): a layer's ``ν`` counts whole experts, so it
takes more tokens to settle."""
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


def _page_layers(path: Path) -> np.ndarray:
    """An int per page of ``path``: the layer (the file's own index) whose block tensor bytes lie there, or -1."""
    gf = read_gguf(path)
    page = mmap.PAGESIZE
    owner = np.full(-(-path.stat().st_size // page), -1, dtype=np.int32)
    for t in gf.tensors:
        il = block_index(t.name)
        if il is not None and t.n_bytes:
            owner[t.offset // page : -(-(t.offset + t.n_bytes) // page)] = il
    return owner


def _advise(path: Path, advice: int) -> None:
    for start, end, _ in mappings_of(path):
        madvise(start, end - start, advice)


@dataclass
class _Counts:
    """Pages per layer (arrays indexed by layer): all of them, those the stream touched, and summed over the
    novelty tokens, those not cached before each and those it brought in."""

    pages: np.ndarray
    hot: np.ndarray
    cold: np.ndarray
    new: np.ndarray


def _stream_then_cold(
    w: LayerWindow,
    path: Path,
    owner: np.ndarray,
    inputs: Inputs,
    tokens: int,
    random_access: bool,
    novel_tokens: int,
    prompt_tokens: int = HOT_PROMPT_TOKENS,
) -> tuple[_Counts, list[float], float | None]:
    """(page counts, r of each cold decode, fault GB/s): the pages a stream of tokens from a cold cache
    touches (read-around off) and those the tokens after it bring in, per layer, then the share each of
    ``tokens`` decodes reads from a cold cache (read-around on unless ``random_access``) and its read speed."""
    n_layers = int(owner.max()) + 1
    layers = owner >= 0
    total = int(layers.sum())

    def per_layer(mask: np.ndarray) -> np.ndarray:
        return np.bincount(owner[mask & layers], minlength=n_layers)

    def resident() -> np.ndarray:
        return resident_pages(path)[: len(owner)] & layers

    at = itertools.count(1 + prompt_tokens)  # the next decode's position
    last: list[WindowOutput | None] = [None]

    def step() -> float:
        pos, t0 = next(at), time.perf_counter()
        last[0] = w.forward(inputs(pos, 1, last[0]), pos)
        return time.perf_counter() - t0

    pages = WindowPages(path)
    try:
        _advise(path, MADV_RANDOM)
        pages.release()
        last[0] = w.forward(inputs(1, prompt_tokens, None), 1)
        for _ in range(HOT_DECODE_TOKENS):
            step()
        before = resident()
        counts = _Counts(per_layer(layers), per_layer(before), np.zeros(n_layers), np.zeros(n_layers))
        if not random_access:
            _advise(path, MADV_NORMAL)
            if w.experts is not None:  # as the agents map it: the experts without read-around, prefetched
                w.experts.advise()
        warm = []
        for _ in range(novel_tokens):
            warm.append(step())
            now = resident()
            counts.cold += per_layer(~before)
            counts.new += per_layer(now & ~before)
            before = now
        shares, faulting = [], 0.0
        for _ in range(tokens):
            pages.release()
            faulting += max(0.0, step() - float(np.median(warm)))
            shares.append(float(resident().sum()) / total)
    finally:
        pages.close()
    read = sum(shares) * total * mmap.PAGESIZE
    return counts, shares, read / faulting / 1e9 if read and faulting > 0 else None


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
    run = _run(path, threads=threads, token_ids=token_ids, tokens=tokens, random_access=random_access)
    if run is None:
        return None
    counts, shares, fault_gbps = run
    hot = float(counts.hot.sum() / counts.pages.sum())
    novel = float(counts.new.sum() / counts.cold.sum()) if counts.cold.sum() else 0.0
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


def _run(
    path: Path,
    *,
    threads: int,
    token_ids: Sequence[int] | None,
    tokens: int,
    random_access: bool = False,
    novel_tokens: int = NOVEL_TOKENS,
    own_tokens: bool = False,
) -> tuple[_Counts, list[float], float | None] | None:
    """:func:`_stream_then_cold` on the window ``path``, fed ``token_ids`` (cycled) or random hidden states;
    ``own_tokens`` (a whole model): the prompt is all of ``token_ids``, then the model decodes its own greedy
    tokens, as in a conversation. None when it has no layer bytes."""
    owner = _page_layers(path)
    if not (owner >= 0).any():
        return None
    rng = np.random.default_rng(0)
    ids = list(token_ids or [])

    def inputs(pos: int, n: int, last: WindowOutput | None) -> np.ndarray:
        if own_tokens and last is not None and last.logits is not None:
            return np.array([int(np.argmax(last.logits))], dtype=np.int32)
        if ids:
            return np.array([ids[(pos + i) % len(ids)] for i in range(n)], dtype=np.int32)
        return rng.standard_normal((n, w.n_embd), dtype=np.float32)

    prompt = len(ids) if own_tokens else HOT_PROMPT_TOKENS
    with LayerWindow(
        path,
        takes_tokens=bool(ids),
        gives_logits=own_tokens,
        n_ctx=max(READ_SHARE_N_CTX, 2 + prompt + HOT_DECODE_TOKENS + novel_tokens + tokens),
        n_batch=HOT_PROMPT_TOKENS,
        n_threads=threads,
        prefetch_experts=True,
    ) as w:
        w.forward(inputs(0, 1, None), 0)  # buffers allocated
        return _stream_then_cold(w, path, owner, inputs, tokens, random_access, novel_tokens, prompt)


@dataclass(frozen=True)
class LayerRouting:
    """The hot and novelty shares (see the module) of each layer of a whole MoE model, in layer order.

    Measured by the controller, which has the model
    (:func:`~homering.profiler.device.model_layer_routing`): the probe window an agent measures holds only
    the first layers, whose routing is the least repetitive (on the synthetic Qwen3-30B-A3B, ``u`` falls
    from 67% at layer 0 to about 20% past layer 10, and ``ν`` from 0.14% at layer 0 to 0.04% on average).
    """

    hot_share: tuple[float, ...]
    novel_share: tuple[float, ...]

    def to_json(self) -> dict[str, list[float]]:
        """``{"hot_share": [...], "novel_share": [...]}``."""
        return {"hot_share": list(self.hot_share), "novel_share": list(self.novel_share)}


def measure_layer_routing(
    model_path: str | Path, *, threads: int, novel_tokens: int = LAYER_NOVEL_TOKENS
) -> LayerRouting | None:
    """Each layer's hot and novelty shares on the whole model at ``model_path``, as in a conversation: the
    prompt is :data:`ROUTING_TEXT`, then the model decodes its own greedy tokens (:data:`HOT_DECODE_TOKENS`
    for ``u``, then ``novel_tokens`` for ``ν``). No cold decodes: the read share and the fault read speed
    are the devices' own. None where the page cache cannot be inspected (not Linux) or the model has no
    layers.

    Raises:
        HomeringError: llama.cpp cannot load the model or decode fails; ModelError: no vocabulary.
    """
    path = Path(model_path)
    if not WindowPages.supported:
        return None
    ids = routing_tokens(str(path))
    run = _run(path, threads=threads, token_ids=ids, tokens=0, novel_tokens=novel_tokens, own_tokens=True)
    if run is None:
        return None
    c = run[0]
    hot = np.maximum(c.hot / np.maximum(c.pages, 1), 1e-6)
    novel = np.divide(c.new, c.cold, out=np.zeros(len(c.new)), where=c.cold > 0)
    log.info(
        "routing of %s: layers' hot share %.1f-%.1f%% (mean %.1f%%), novelty share mean %.3f%%",
        path.name,
        100 * hot.min(),
        100 * hot.max(),
        100 * hot.mean(),
        100 * novel.mean(),
    )
    return LayerRouting(tuple(float(x) for x in hot), tuple(float(x) for x in novel))


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

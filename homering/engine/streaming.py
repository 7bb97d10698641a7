"""Streaming a window's tail from disk: the overflow mode of the latency model, made true at run time.

PRIMA.CPP's latency model (arXiv 2504.08791, §3; :mod:`homering.planner.model`) charges a device whose
windows exceed its RAM a re-read of only the excess per token. Linux's page cache does not behave so by
itself: a mapped window a little larger than the memory it may use is read cyclically, and LRU evicts
exactly the pages needed next, so most of the window is read again every token (measured on the 32B
cluster: 4305 ms/token against 2591 predicted). So a device in overflow mode keeps a *prefix* of its
layers (as many bytes as the plan's ``keep_bytes``) and *streams* the rest: the window's graph hook drops
each streamed layer's pages as soon as the layer's output is computed, see ``_evalhook.c``, and the
kernel's fault read-around reads the next one. (Reading the next layers ahead with ``WILLNEED`` measured
slower: on a 14-layer 32B window streaming 6 layers under a 2.98 GB/s read throttle, 1750 ms/token with one
layer and 1440 with two read ahead, 1092-1275 with none: the read-ahead queues in front of the computing
layer's own reads.) The page cache then holds the kept layers and the streamed one in
flight, and the disk reads the streamed layers once per token (measured by hand on a 14-layer 32B window
in a 3200 MiB cgroup: 1.72 GB read per token instead of the kernel's 3.82, 1.8-2.1x faster).

Linux only (``madvise``/``posix_fadvise``); elsewhere nothing streams and the kernel decides.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

from homering.engine.evalhook import EvalHook, LayerPages
from homering.engine.pages import mappings_of, readahead_limit
from homering.errors import HomeringError
from homering.models.gguf_file import read_gguf
from homering.models.gguf_info import block_index

log = logging.getLogger("homering.streaming")

SUPPORTED = hasattr(os, "posix_fadvise")


def layer_spans(path: str | Path) -> list[tuple[int, int]]:
    """Each layer's weights in a window file: ``(start, end)`` byte offsets, by the window's own layer index.

    Raises:
        HomeringError: the file cannot be read, or a layer's tensors are not contiguous (another layer's, or
            a tensor of no layer, lies between them), so a layer cannot be dropped alone.
    """
    try:
        gf = read_gguf(path)
    except (OSError, ValueError) as exc:
        raise HomeringError(f"cannot read the tensors of {path}: {exc}") from exc
    spans: dict[int, tuple[int, int]] = {}
    for t in gf.tensors:
        il = block_index(t.name)
        if il is None:
            continue
        lo, hi = spans.get(il, (t.offset, t.offset + t.n_bytes))
        spans[il] = (min(lo, t.offset), max(hi, t.offset + t.n_bytes))
    if sorted(spans) != list(range(len(spans))):
        raise HomeringError(f"{path}: layers {sorted(spans)} are not 0..{len(spans) - 1}")
    out = [spans[il] for il in range(len(spans))]
    owned = sum(t.n_bytes for t in gf.tensors if block_index(t.name) is not None)
    ordered = sorted(out)
    for a, b in zip(ordered, ordered[1:]):
        if b[0] < a[1]:
            raise HomeringError(f"{path}: the layers' tensors are interleaved; its tail cannot stream")
    holes = sum(hi - lo for lo, hi in out) - owned
    if holes > gf.alignment * len(gf.tensors):
        raise HomeringError(f"{path}: other tensors lie between a layer's tensors; its tail cannot stream")
    return out


def unread_span(path: str | Path, *, gives_logits: bool) -> tuple[int, int] | None:
    """The token embedding's bytes in a window file, when the window only looks rows up in it: ``(start,
    end)``, or None (no token embedding; or a window that gives logits from a model without its own
    ``output.weight``, whose output projection is the embedding and reads all of it).

    Raises:
        HomeringError: the file cannot be read.
    """
    try:
        gf = read_gguf(path)
    except (OSError, ValueError) as exc:
        raise HomeringError(f"cannot read the tensors of {path}: {exc}") from exc
    names = {t.name: t for t in gf.tensors}
    embd = names.get("token_embd.weight")
    if embd is None or (gives_logits and "output.weight" not in names):
        return None
    return embd.offset, embd.offset + embd.n_bytes


def stream_starts(layer_bytes: list[list[int]], keep_bytes: int) -> list[int | None]:
    """Where each window's streamed tail begins, when a device keeps ``keep_bytes`` of its layers.

    Args:
        layer_bytes: per window, in round order, each layer's weight bytes.
        keep_bytes: bytes of layer weights the device keeps in memory (the plan's ``keep_bytes``).

    Returns:
        Per window, the first streamed layer (its own index), or None when the window is kept whole. The
        kept bytes are a prefix in the order the device computes: once a layer does not fit, it and every
        layer after it, in this window and the later ones, stream.
    """
    out: list[int | None] = []
    left, streaming = keep_bytes, False
    for sizes in layer_bytes:
        first = None
        for il, size in enumerate(sizes):
            if streaming or size > left:
                streaming, first = True, il
                break
            left -= size
        out.append(first)
    return out


def _drop_ranges(spans: list[tuple[int, int]], first: int, reach: int) -> list[tuple[int, int]]:
    """Per layer, the whole pages to drop once it is computed: its own, and those of the streamed layers
    before it that end where the next begins (a window written in layer order), back to ``reach`` bytes
    before its start and one layer more.

    Two reasons to reach back. A fault in a layer reads around it, up to the kernel's read-ahead limit
    (``reach``, :func:`~homering.engine.pages.readahead_limit`) on either side, so it reads back the end of
    layers already dropped. And the page cache keeps large folios, which ``POSIX_FADV_DONTNEED`` skips when
    they reach outside the range: the folio across two streamed layers would never go otherwise.
    """
    page = mmap.PAGESIZE
    out = []
    for il, (lo, hi) in enumerate(spans):
        j = il
        while j > first and 0 <= spans[j][0] - spans[j - 1][1] < page and lo - spans[j][0] < reach:
            j -= 1
        out.append((-(-spans[j][0] // page) * page, hi // page * page))
    return out


class TailStream:
    """The streaming of one window's tail, wired into its graph hook (see the module docstring).

    Args:
        path: the window file; llama.cpp must have mapped it already (the model is loaded).
        hook: the window context's :class:`~homering.engine.evalhook.EvalHook`.
        first: the first streamed layer (the window's own index).

    Raises:
        HomeringError: the file's layers cannot be dropped one at a time (:func:`layer_spans`).
    """

    def __init__(self, path: str | Path, hook: EvalHook, first: int) -> None:
        self.path = Path(path)
        spans = layer_spans(self.path)
        maps = mappings_of(self.path)
        if len(maps) != 1:
            log.warning("%s: %d mappings of it, not llama.cpp's one: streamed layers stay mapped", path, len(maps))
        self._pages = (LayerPages * max(1, len(spans)))()
        for il, (start, end) in enumerate(_drop_ranges(spans, first, readahead_limit(self.path))):
            addr = 0
            if len(maps) == 1 and maps[0][2] <= start and end - maps[0][2] <= maps[0][1] - maps[0][0]:
                addr = maps[0][0] + start - maps[0][2]
            # (no MADV_SEQUENTIAL: its fault read-ahead made a 32B window 2.2x slower)
            self._pages[il] = LayerPages(addr, max(0, end - start), start)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.first = first
        self._hook = hook
        hook.layers = ctypes.cast(self._pages, ctypes.c_void_p).value
        hook.n_layers, hook.stream_first = len(spans), first
        hook.fd = self.fd

    @property
    def dropped(self) -> int:
        """Layers dropped from memory so far (each streamed layer once per graph that ran it)."""
        return int(self._hook.dropped)

    def close(self) -> None:
        """Stop streaming (the hook keeps its target) and close the file."""
        self._hook.fd, self._hook.n_layers, self._hook.layers = -1, 0, None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

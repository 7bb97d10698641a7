"""Reading a mixture of experts' routed experts from disk, and nothing more: the overflow mode of a MoE.

A Qwen3-MoE layer routes each token to 8 of its 128 experts. A device whose layers do not fit its RAM
leaves their pages to the kernel (:mod:`homering.planner.model`): the experts its tokens use stay in the
page cache, and a token that routes to an expert not there faults it in. Left alone, the kernel answers
each such fault with its read-around: a window of the disk's read-ahead size (8 MiB on this project's test
machine, twice that once llama.cpp advises ``POSIX_FADV_SEQUENTIAL``) around the faulting page, several
experts' worth, most of them not routed to. Measured on the synthetic Qwen3-30B-A3B, whole model: a token
brought in 1.3% of the expert pages not yet cached with read-around and 0.10% without, 13x less. How much
read-around the kernel really does on a device at its memory limit also varies (its ``mmap_miss``
heuristic turns read-around off for a file that misses much), so what an overflowing device read per
token was neither small nor predictable (0.1-1.5% of its uncached bytes between runs of one plan).

So on an overflowing MoE device the window's expert tensors are mapped ``MADV_RANDOM`` (no read-around;
the token embedding too, which a first window only looks rows up in) and its graph hook (``_evalhook.c``)
prefetches: once a layer's router has chosen (the graph node ``ffn_moe_topk-<il>``), it advises
``WILLNEED`` on the chosen experts' slices of the layer's expert tensors (an expert is one contiguous slice
of each: the tensors are ``[n_in, n_out, n_expert]``). The disk reads exactly the routed experts that are
not cached, in requests of a whole expert, before the expert products need them. The profiler measures the
routing the same way (:mod:`homering.profiler.experts`).

Linux only (``madvise``); elsewhere nothing is prefetched and the kernel decides.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from pathlib import Path

from homering.engine.evalhook import EvalHook, ExpertSlices
from homering.engine.pages import madvise, mappings_of
from homering.models.gguf_file import read_gguf
from homering.models.gguf_info import block_index

log = logging.getLogger("homering.prefetch")

SUPPORTED = hasattr(os, "posix_fadvise")
EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
"""A MoE layer's expert tensors (llama.cpp's names), in the order the hook keeps them."""
MADV_RANDOM = 1  # Linux <asm-generic/mman-common.h>


def expert_tensors(path: str | Path) -> dict[int, dict[str, tuple[int, int, int]]]:
    """A window file's expert tensors: per layer (the window's own index), per name of
    :data:`EXPERT_TENSORS`, ``(offset, bytes, n_expert)``; {} for a dense model.

    Raises:
        OSError, ValueError: the file cannot be read as a GGUF.
    """
    out: dict[int, dict[str, tuple[int, int, int]]] = {}
    for t in read_gguf(path).tensors:
        il = block_index(t.name)
        name = t.name.split(".")[2] if il is not None and t.name.count(".") >= 3 else ""
        if il is not None and name in EXPERT_TENSORS and len(t.dims) == 3 and t.dims[2] > 0:
            out.setdefault(il, {})[name] = (t.offset, t.n_bytes, t.dims[2])
    return out


def _address(maps: list[tuple[int, int, int]], offset: int, length: int) -> int:
    """Where file bytes ``[offset, offset + length)`` lie in one of ``maps`` (``mappings_of``), or 0."""
    for start, end, at in maps:
        if at <= offset and offset + length <= at + (end - start):
            return start + offset - at
    return 0


class ExpertPrefetch:
    """The routed-expert prefetch of one window, wired into its graph hook (see the module docstring).

    Args:
        path: the window file; llama.cpp must have mapped it already (the model is loaded).
        hook: the window context's :class:`~homering.engine.evalhook.EvalHook`.
        n_batch: the most tokens one graph carries (the router's choices are ``n_expert_used`` ints each).
        lookup: the file bytes ``(start, end)`` of a token embedding the window only looks rows up in
            (:func:`~homering.engine.streaming.unread_span`): mapped without read-around too, so a token
            reads its row, not the read-around's megabytes of other rows.

    Attributes:
        layers: the window's MoE layers (0: a dense window, nothing prefetched).
    """

    def __init__(self, path: str | Path, hook: EvalHook, n_batch: int, lookup: tuple[int, int] | None = None) -> None:
        self.path = Path(path)
        experts = expert_tensors(self.path)
        self.layers = (max(experts) + 1) if experts else 0
        self._hook = hook
        if not self.layers:
            return
        maps = mappings_of(self.path)
        n_expert = max(n for tensors in experts.values() for _, _, n in tensors.values())
        self._slices = (ExpertSlices * (self.layers * len(EXPERT_TENSORS)))()
        self._ranges: list[tuple[int, int]] = []
        mapped = 0
        if lookup is not None and _address(maps, lookup[0], lookup[1] - lookup[0]):
            self._ranges.append((_address(maps, lookup[0], lookup[1] - lookup[0]), lookup[1] - lookup[0]))
        for il, tensors in experts.items():
            for j, name in enumerate(EXPERT_TENSORS):
                if name not in tensors:
                    continue
                offset, n_bytes, n = tensors[name]
                addr = _address(maps, offset, n_bytes)
                if addr:
                    self._slices[il * len(EXPERT_TENSORS) + j] = ExpertSlices(addr, n_bytes // n)
                    self._ranges.append((addr, n_bytes))
                    mapped += 1
        self._ids = (ctypes.c_int * (n_batch * n_expert))()  # n_expert_used <= n_expert
        self.advise()
        hook.experts = ctypes.cast(self._slices, ctypes.c_void_p).value
        hook.ids = ctypes.cast(self._ids, ctypes.c_void_p).value
        hook.ids_bytes = ctypes.sizeof(self._ids)
        hook.n_expert, hook.moe_tensors, hook.moe_layers = n_expert, len(EXPERT_TENSORS), self.layers
        if not mapped:
            log.warning("%s: its expert tensors are not in llama.cpp's mapping: nothing is prefetched", path)

    def advise(self) -> None:
        """Map the expert tensors (and the looked-up embedding) ``MADV_RANDOM`` (again: after an ``madvise`` over
        the whole mapping)."""
        page = mmap.PAGESIZE
        for addr, n_bytes in self._ranges if self.layers else []:
            lo = addr // page * page
            madvise(lo, -(-(addr + n_bytes - lo) // page) * page, MADV_RANDOM)

    @property
    def prefetched(self) -> int:
        """Expert slices advised ``WILLNEED`` so far: those of routed experts that were not in the page cache
        (a routed expert is one slice per expert tensor)."""
        return int(self._hook.prefetched)

    def close(self) -> None:
        """Stop prefetching (the hook keeps its other jobs)."""
        self._hook.moe_layers, self._hook.experts = 0, None

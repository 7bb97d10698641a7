"""An overflowing device streams the layers it cannot keep (homering.engine.streaming): same tokens, and only
the kept layers stay in the page cache; the planner's keep_bytes and re-read agree with it."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest

from homering.engine import pages, streaming
from homering.engine.window import LayerWindow
from homering.models.slicing import Role, WindowSpec, slice_window
from homering.planner.model import STREAMED_LAYERS, evaluate
from tests.test_planner import dev, spec_of

needs_fadvise = pytest.mark.skipif(not streaming.SUPPORTED, reason="needs posix_fadvise and madvise (Linux)")


def _resident_pages(path, spans) -> list[tuple[int, int]]:
    """(pages in the page cache, pages) of each layer span of ``path``, by mincore over a fresh mapping."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    size, page = os.path.getsize(path), mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm:
        view = np.frombuffer(mm, dtype=np.uint8)
        vec = np.zeros((size + page - 1) // page, dtype=np.uint8)
        assert libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec.ctypes.data) == 0
        del view
    out = []
    for lo, hi in spans:  # whole pages inside each span (the boundary pages are shared with the neighbours)
        first, end = -(-lo // page), hi // page
        out.append((int((vec[first:end] & 1).sum()), end - first))
    return out


def test_stream_starts_keep_a_prefix_in_compute_order():
    sizes = [[10, 10, 10], [10, 10, 10]]
    assert streaming.stream_starts(sizes, 100) == [None, None]
    assert streaming.stream_starts(sizes, 25) == [2, 0]  # once a layer does not fit, every later one streams
    assert streaming.stream_starts(sizes, 45) == [None, 1]
    assert streaming.stream_starts(sizes, 0) == [0, 0]
    assert streaming.stream_starts([[10, 50, 1]], 30) == [1]  # the small layer after the big one streams too


@needs_fadvise
def test_streamed_tails_give_the_same_tokens_and_leave_only_the_kept_layers_in_memory(smollm2, smollm2_ref):
    """A hidden-state window and the logits window stream their tails: 24 greedy tokens identical to the
    unsplit model; afterwards the streamed layers are out of the page cache and the kept ones are in."""
    cuts, stream_from = [0, 10, 20, 30], [4, None, 3]
    windows = []
    for (a, b), first in zip(zip(cuts[:-1], cuts[1:]), stream_from):
        role = Role.for_range(a, b, cuts[-1])
        path = slice_window(smollm2, WindowSpec(a, b, role), progress=False)
        windows.append(
            LayerWindow(
                path,
                takes_tokens=role.takes_tokens,
                gives_logits=role.gives_logits,
                n_ctx=256,
                n_threads=2,
                stream_from=first,
            )
        )
    try:
        ids = smollm2_ref.tokenize("The capital of France is")
        ref_tokens, _ = smollm2_ref.greedy(ids, 24)
        tokens, x, pos = [], np.array(ids, dtype=np.int32), 0
        for _ in range(25):
            h = x
            for w in windows:
                out = w.forward(h, pos)
                h = out.hidden
            pos += len(x)
            tokens.append(int(np.argmax(out.logits)))
            x = np.array(tokens[-1:], dtype=np.int32)
        assert tokens[:24] == ref_tokens
        assert windows[1].stream is None
        for w, first in zip(windows, stream_from):
            if first is None:
                continue
            assert w.stream is not None and w.stream.dropped == 25 * (10 - first)  # every streamed layer, every pass
            resident = _resident_pages(w.path, streaming.layer_spans(w.path))
            if not any(n for n, _ in resident[:first]):
                pytest.skip("nothing of the window is in the page cache (a filesystem without one?)")
            assert all(n == total for n, total in resident[:first]), resident  # kept
            # streamed and dropped; the kernel's read-around, when the next layer faults before its read-ahead
            # arrived, may read back a few pages at a layer's end (12 of 540 measured)
            assert all(n <= total // 16 for n, total in resident[first:]), resident
    finally:
        for w in windows:
            w.close()


def test_an_overflowing_device_keeps_its_ram_less_the_buffers_and_rereads_the_rest():
    """keep_bytes + the re-read are the device's layers; the re-read is the excess plus the streamed layers."""
    spec = spec_of([dev("small", ram=6.0, disk=10.0, cpu=10), dev("head", cpu=200, head=True)], layers=12)
    pred = evaluate(spec, 1, [9, 3])
    small = pred.devices[0]
    assert small.mode == "overflow" and small.keep_bytes is not None
    b = spec.model.layer_bytes
    reread = 9 * b - small.keep_bytes
    d = spec.ring()[0]
    assert small.disk_ms == pytest.approx(d.disk_ms(reread))
    need_minus_ram = reread - STREAMED_LAYERS * b
    assert 0 < need_minus_ram < 9 * b  # the excess, beside the streamed layers in flight
    assert small.keep_bytes < d.ram_bytes  # the buffers and the streamed layers take the rest
    resident = evaluate(spec, 1, [5, 7]).devices[0]
    assert resident.mode == "resident" and resident.keep_bytes is None


@needs_fadvise
def _load_plan(model, *, n_layers: int, release=None, **me):
    """A one-agent PlanLoader's ring for a plan over ``model`` whose agent has the fields ``me``."""
    import asyncio

    from homering.agent.loading import ModelSource, PlanLoader
    from homering.models.gguf_info import fingerprint
    from homering.tasks import Tasks
    from tests.test_agent_ring import make_plan

    plan = make_plan(1, 1, model_path=str(model), fp=fingerprint(model), n_layers=n_layers)
    plan = plan.model_copy(update={"ring": [plan.ring[0].model_copy(update=me)]})

    async def load():
        async def report(*_):
            pass

        loader = PlanLoader(
            "head",
            threads=1,
            key=None,
            source=ModelSource("127.0.0.1"),
            release=release,
            tasks=Tasks("test"),
            report=report,
            controller_api=lambda: None,
        )
        await asyncio.wait_for(loader.offer(plan), 60)
        return loader.ring

    return asyncio.run(load())


def test_an_agent_in_overflow_mode_streams_what_the_plan_does_not_keep(smollm2):
    """The plan's keep_bytes decide the first streamed layer; --no-release (release=False) streams nothing."""
    sizes = [hi - lo for lo, hi in streaming.layer_spans(smollm2)]
    keep = sum(sizes[:12]) + sizes[12] // 2
    for release, first in ((None, 12), (False, None)):
        ring = _load_plan(smollm2, n_layers=30, release=release, mode="overflow", keep_bytes=keep)
        try:
            stream = ring.windows[0].stream
            assert (stream.first if stream else None) == first
        finally:
            ring.close()


@needs_fadvise
def test_prefetching_a_first_window_leaves_out_its_token_embedding(smollm2):
    """A token window looks a few rows up in its embedding: prefetching it must not read the whole table
    (440 MB at 32B), unless the table is also the output projection (tied, as in SmolLM2's whole model)."""
    import time

    from homering.models.gguf_file import read_gguf

    assert streaming.unread_span(smollm2, gives_logits=True) is None  # tied: the output reads all of it
    path = slice_window(smollm2, WindowSpec(0, 10, Role.FIRST), progress=False)
    embd = next(t for t in read_gguf(path).tensors if t.name == "token_embd.weight")
    skip = streaming.unread_span(path, gives_logits=False)
    assert skip == (embd.offset, embd.offset + embd.n_bytes)
    window = pages.WindowPages(path, skip=skip)
    try:
        window.release()
        window.prefetch()
        layers = streaming.layer_spans(path)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(n == total for n, total in _resident_pages(path, layers)):
                break
            time.sleep(0.05)
        if not any(n for n, _ in _resident_pages(path, layers)):
            pytest.skip("nothing was read into the page cache (a filesystem without one?)")
        assert all(n == total for n, total in _resident_pages(path, layers))  # the layers are read
        [(n, total)] = _resident_pages(path, [(embd.offset, embd.offset + embd.n_bytes)])
        assert n <= total // 16, (n, total)  # the table is not (read-around may touch its edge)
    finally:
        window.close()


def _routed_slices(path) -> set[tuple[int, str, int]]:
    """(layer, expert tensor, expert) of ``path`` whose pages are mostly in the page cache."""
    from homering.engine.prefetch import expert_tensors

    slices, keys = [], []
    for il, tensors in expert_tensors(path).items():
        for name, (offset, n_bytes, n) in tensors.items():
            for e in range(n):
                keys.append((il, name, e))
                slices.append((offset + e * n_bytes // n, offset + (e + 1) * n_bytes // n))
    return {key for key, (cached, total) in zip(keys, _resident_pages(path, slices)) if 2 * cached > total}


@needs_fadvise
def test_prefetching_routed_experts_reads_exactly_them_and_changes_no_logit(qwen3moe_small):
    """From a cold page cache, with no read-around anywhere, a 2-token batch of the MoE leaves in memory only
    the experts its router chose (page faults on them); with the prefetch the same slices, each advised once,
    and the same logits. A hook that misreads the router's [k, tokens] view (its rows are n_expert apart)
    prefetches experts nobody chose."""
    from homering.profiler.experts import MADV_RANDOM, _advise

    def cold(prefetch: bool):
        with LayerWindow(
            qwen3moe_small, takes_tokens=True, gives_logits=True, n_ctx=32, n_batch=8, prefetch_experts=True
        ) as w:
            assert w.experts is not None and w.experts.layers == 6
            _advise(qwen3moe_small, MADV_RANDOM)  # only what the graph touches comes in
            if not prefetch:
                w.experts.close()  # the hook stops prefetching; the mapping stays without read-around
            cache = pages.WindowPages(qwen3moe_small)
            try:
                cache.release()
                out = w.forward(np.array([17, 4242], dtype=np.int32), 0)
                return out.logits, _routed_slices(qwen3moe_small), w.experts.prefetched
            finally:
                cache.close()

    logits, routed, advised = cold(True)
    plain_logits, faulted, none = cold(False)
    assert np.array_equal(logits, plain_logits)
    assert none == 0 and advised == len(routed)
    assert routed == faulted
    per_layer = [sum(1 for il, name, _ in routed if il == layer and name == "ffn_up_exps") for layer in range(6)]
    assert all(1 <= n <= 4 for n in per_layer), per_layer  # 2 tokens route to 2 of 8 experts each


def test_an_agent_prefetches_experts_only_in_overflow_mode(qwen3moe_small):
    """A MoE device the plan overflows opens its windows with the expert prefetch; a resident one does not."""
    for mode, layers in (("overflow", 6 if streaming.SUPPORTED else None), ("resident", None)):
        ring = _load_plan(qwen3moe_small, n_layers=6, mode=mode)
        try:
            experts = ring.windows[0].experts
            assert (experts.layers if experts else None) == layers
        finally:
            ring.close()

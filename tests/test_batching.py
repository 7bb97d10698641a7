"""Several sequences in one window: shared batches give exactly the outputs of separate runs;
the admission queue and stop strings."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from homering.controller.admission import QueueFull, Sequences
from homering.engine.sampling import StopMatcher
from homering.engine.window import LayerWindow
from homering.models.slicing import Role, WindowSpec, slice_window

PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 9690, 28, 1351, 314, 260, 2386], [1, 378, 1165, 12960]]


def _windows(path, **kw):
    return [LayerWindow(path, n_ctx=128, n_batch=32, n_threads=1, n_seq_max=3, **kw) for _ in range(2)]


def test_mixed_sequence_batches_equal_separate_runs_on_the_logits_window(smollm2):
    """Three prompts decoded one at a time vs together (prefill and decode steps in shared batches):
    bit-identical logits, so greedy tokens cannot differ."""
    alone, together = _windows(smollm2, takes_tokens=True, gives_logits=True)
    with alone, together:
        ref = [alone.forward(np.array(p), 0, s).logits for s, p in enumerate(PROMPTS)]
        got = [o.logits for o in together.forward_many([(np.array(p), 0, s) for s, p in enumerate(PROMPTS)])]
        for a, b in zip(ref, got):
            assert np.array_equal(a, b)
        for step in range(4):  # decode: one token per sequence, in one batch
            nxt = [int(np.argmax(x)) for x in ref]
            ref = [alone.forward(np.array([t]), len(p) + step, s).logits for s, (t, p) in enumerate(zip(nxt, PROMPTS))]
            got = [
                o.logits
                for o in together.forward_many(
                    [(np.array([t]), len(p) + step, s) for s, (t, p) in enumerate(zip(nxt, PROMPTS))]
                )
            ]
            for a, b in zip(ref, got):
                assert np.array_equal(a, b)


def test_mixed_sequence_batches_equal_separate_runs_on_a_hidden_state_window(smollm2):
    """A first window (token ids in, hidden states out): every row lands with its own sequence, and an item
    longer than n_batch is split across llama_decode calls."""
    path = slice_window(smollm2, WindowSpec(0, 10, Role.FIRST), progress=False)
    alone, together = _windows(path, takes_tokens=True, gives_logits=False)
    long_prompt = list(np.arange(1, 41) * 7)  # 40 tokens > n_batch 32
    prompts = [PROMPTS[0], long_prompt, PROMPTS[2]]
    with alone, together:
        ref = [alone.forward(np.array(p), 0, s).hidden for s, p in enumerate(prompts)]
        got = [o.hidden for o in together.forward_many([(np.array(p), 0, s) for s, p in enumerate(prompts)])]
        for a, b in zip(ref, got):
            assert a.shape == b.shape and np.array_equal(a, b)


def test_sequences_first_come_first_served_and_bounded():
    async def go():
        seqs = Sequences(2, max_queue=1)
        a = await seqs.acquire()
        assert seqs.busy_since is None  # one is still free
        b = await seqs.acquire()
        assert {a, b} == {0, 1} and seqs.in_use == 2
        full_at = seqs.busy_since
        assert full_at is not None  # none free from now on (/health's "degraded" counts from here)
        waiter = asyncio.create_task(seqs.acquire())
        await asyncio.sleep(0)
        assert seqs.queue_depth == 1
        with pytest.raises(QueueFull):
            await seqs.acquire()
        seqs.release(b)
        assert await waiter == b  # the waiter got the freed sequence
        assert seqs.busy_since == full_at  # handed straight on: still none free
        gone = asyncio.create_task(seqs.acquire())
        await asyncio.sleep(0)
        gone.cancel()  # a client that left the queue
        await asyncio.gather(gone, return_exceptions=True)
        seqs.release(a)
        assert seqs.queue_depth == 0 and seqs.in_use == 1 and seqs.busy_since is None
        with pytest.raises(ValueError):
            seqs.release(a)

    asyncio.run(go())


def test_stop_strings_are_cut_and_never_streamed_in_part():
    m = StopMatcher(["\n\nUser:", "END"])
    shown = m.feed("Hello") + m.feed(" world\n") + m.feed("\nUs")
    assert shown == "Hello world" and not m.stopped  # "\n\nUs" may still become a stop string: held back
    assert m.feed("er: hi") == "" and m.stopped
    m = StopMatcher(["END"])
    assert m.feed("THE EN") + m.feed("ding") + m.flush() == "THE ENding" and not m.stopped
    m = StopMatcher([])
    assert m.feed("abc") == "abc"

"""The agent's loaded plan and its threads, in process with stand-in windows: the head's requests and their
batching, failed sends, the link threads, the generation loop, and plan loading failures.

No llama.cpp model runs here: :class:`FakeWindow` computes a deterministic stand-in (logits that pick
``(pos + 1) % N_VOCAB``), so these tests see the agent's own logic only. The real windows and rings are in
test_rounds, test_cluster and test_faults.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from homering.agent.forwarding import Forwarder
from homering.agent.generation import Generator
from homering.agent.loading import ModelSource, PlanLoader
from homering.agent.ring import Ring
from homering.agent.slots import Interrupted
from homering.agent.telemetry import StreamHistory
from homering.engine.window import WindowOutput
from homering.models.gguf_info import fingerprint
from homering.tasks import Tasks
from homering.wire import (
    AgentState,
    EventType,
    Frame,
    FrameKind,
    GenerateJob,
    Plan,
    PlanAgent,
    Sampling,
    StreamEvent,
    WindowAssignment,
)

N_EMBD = 4
N_VOCAB = 16
EOG = 15


class FakeWindow:
    """A stand-in LayerWindow: hidden states are the inputs' sums; logits pick ``(pos + 1) % N_VOCAB``."""

    def __init__(self, gives_logits: bool = False) -> None:
        self.gives_logits = gives_logits
        self.n_vocab = N_VOCAB
        self.path = Path("fake.gguf")
        self.removed: list[tuple[int, int]] = []
        self.closed = False

    def _out(self, x: np.ndarray, pos: int) -> WindowOutput:
        n = len(x)
        if self.gives_logits:
            logits = np.zeros(N_VOCAB, dtype=np.float32)
            logits[(pos + n) % N_VOCAB] = 1.0
            return WindowOutput(logits=logits)
        rows = np.asarray(x, dtype=np.float32).reshape(n, -1).sum(axis=1, keepdims=True)
        return WindowOutput(hidden=np.repeat(rows, N_EMBD, axis=1))

    def forward(self, x: np.ndarray, pos: int, seq_id: int = 0) -> WindowOutput:
        return self._out(x, pos)

    def forward_many(
        self, items: list[tuple[np.ndarray, int, int]], rows: list[bool] | None = None, embed: list[bool] | None = None
    ) -> list[WindowOutput]:
        assert not any(rows or []) and not any(embed or []), "these tests send no verification trips or embeddings"
        return [self._out(x, pos) for x, pos, _ in items]

    def kv_remove(self, seq_id: int, p0: int = 0) -> None:
        self.removed.append((seq_id, p0))

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def token_bytes(self, token: int) -> bytes:
        return f"<{token}>".encode()

    def close(self) -> None:
        self.closed = True


def make_plan(
    n_agents: int = 2,
    k: int = 1,
    *,
    n_parallel: int = 2,
    depth: int | None = None,
    head: str = "head",
    model_path: str = "/nonexistent.gguf",
    fp: str = "f",
    n_layers: int = 0,
) -> Plan:
    n_layers = n_layers or 2 * n_agents * k
    names = [f"a{i}" for i in range(n_agents - 1)] + [head]
    w = n_layers // (n_agents * k)
    ring = [
        PlanAgent(
            name=name,
            host="127.0.0.1",
            data_port=9,
            windows=[
                WindowAssignment(start=(r * n_agents + i) * w, end=(r * n_agents + i + 1) * w, round=r)
                for r in range(k)
            ],
        )
        for i, name in enumerate(names)
    ]
    return Plan(
        plan_id="p1",
        model_path=model_path,
        model_fingerprint=fp,
        n_layers=n_layers,
        n_ctx=64,
        n_parallel=n_parallel,
        planner="proportional",
        k=k,
        pipeline_depth=depth,
        ring=ring,
    )


def head_ring(k: int = 1, *, depth: int | None = None, n_parallel: int = 2) -> tuple[Ring, socket.socket]:
    """The head of a 2-agent ring whose link to its successor is one end of a socket pair (the other end
    returned: closing it breaks the link, the next send fails with EPIPE)."""
    plan = make_plan(2, k, n_parallel=n_parallel, depth=depth)
    ring = Ring(plan, 1, [FakeWindow(gives_logits=(r == k - 1)) for r in range(k)])
    mine, theirs = socket.socketpair()
    ring.connect(mine)
    return ring, theirs


def forward_frame(slot, pos: int = 0) -> Frame:
    return Frame.forward(slot.number, slot.seq_id, pos, np.array([1, 2], dtype=np.int32))


# ------------------------------------------------------------------ the head's batching and failed sends
def test_leave_wakes_the_requests_whose_frames_it_could_not_send(caplog):
    """A request that ends sends the frames other requests queued meanwhile; when that send fails, those
    requests end at once ("cannot reach the next agent"), with a warning: they used to wait for the ring's
    stall timeout while the frames were dropped with a debug line."""
    ring, theirs = head_ring(depth=1)  # one group: a request's frames wait while another one samples
    a, b = ring.claim("ra", 0), ring.claim("rb", 1)
    ring.submit(a, [forward_frame(a)])  # nobody samples: sent at once
    ring.deliver(a.number, forward_frame(a))  # back: "a" samples its next token
    ring.submit(b, [forward_frame(b)])  # waits for "a" (the group holds both)
    theirs.close()  # the successor is gone
    with caplog.at_level(logging.WARNING, logger="homering.agent"):
        ring.release(a)  # "a" is done: the group goes now, and the link is broken
    with pytest.raises(Interrupted, match="cannot reach the next agent"):
        b.wait(timeout=2)
    assert any("cannot reach the next agent" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    ring.release(b)
    ring.close()


def test_a_failed_send_ends_every_request_whose_frames_it_carried(caplog):
    """A group that cannot be sent carries several requests' frames: each of them ends at once, not only
    the one whose submit sent the group."""
    ring, theirs = head_ring(depth=1)
    a, b = ring.claim("ra", 0), ring.claim("rb", 1)
    ring.submit(a, [forward_frame(a)])
    ring.deliver(a.number, forward_frame(a))
    assert a.wait(timeout=1).header.kind is FrameKind.FORWARD  # "a" got its frame back and samples
    ring.submit(b, [forward_frame(b)])  # queued
    theirs.close()  # the successor is gone
    with caplog.at_level(logging.WARNING, logger="homering.agent"):
        ring.submit(a, [forward_frame(a, 2)])  # the group (a's and b's frames) goes, and fails
    with pytest.raises(Interrupted, match="cannot reach the next agent"):
        b.wait(timeout=2)
    with pytest.raises(Interrupted, match="cannot reach the next agent"):
        a.wait(timeout=2)
    assert "dropped 2 frame(s) of 2 request(s)" in caplog.text
    ring.release(a)
    ring.release(b)
    ring.close()


def test_a_link_thread_that_cannot_pass_a_round_on_ends_the_head_requests(caplog):
    """k = 2 on the head: round 0's output goes back into the ring as round 1 from the link thread. When
    that send fails, the request ends at once (it used to wait for the stall timeout) and the log says so."""
    ring, theirs = head_ring(k=2)
    slot = ring.claim("r", 0)
    hidden = Frame.forward(slot.number, slot.seq_id, 0, np.ones((3, N_EMBD), dtype=np.float32), 0)
    theirs.close()  # the successor is gone
    with caplog.at_level(logging.WARNING, logger="homering.agent"):
        Forwarder("head", lambda: ring).handle(ring, [hidden])
    with pytest.raises(Interrupted, match="cannot reach the next agent"):
        slot.wait(timeout=2)
    assert "cannot reach the next agent" in caplog.text
    ring.release(slot)
    ring.close()


def test_the_last_round_reaches_the_generation_loop_and_errors_go_with_it():
    """On the head, the last round's output (logits), KV removals and ERROR frames go to the request's loop;
    a FORWARD frame of a round the plan does not have comes back as an ERROR naming it."""
    ring, theirs = head_ring(k=2)
    slot = ring.claim("r", 0)
    fwd = Forwarder("head", lambda: ring)
    last = Frame.forward(slot.number, slot.seq_id, 5, np.ones((2, N_EMBD), dtype=np.float32), 1)
    fwd.handle(
        ring,
        [
            last,
            Frame.kv_remove(slot.number, slot.seq_id, 3),
            Frame.forward(slot.number, slot.seq_id, 0, np.ones((1, N_EMBD), dtype=np.float32), 7),
        ],
    )
    logits = slot.wait(timeout=1)
    assert isinstance(logits.payload, np.ndarray) and int(np.argmax(logits.payload)) == 7
    assert slot.wait(timeout=1).header.kind is FrameKind.KV_REMOVE
    assert ring.windows[0].removed == [(0, 3)] and ring.windows[1].removed == [(0, 3)]
    error = slot.wait(timeout=1)
    assert error.header.kind is FrameKind.ERROR and "round 7 of a 2-round plan" in error.payload
    ring.release(slot)
    ring.close()
    theirs.close()


def test_sequences_are_claimed_once_and_a_closing_ring_takes_none():
    ring, theirs = head_ring()
    slot = ring.claim("r1", 0)
    with pytest.raises(Exception, match="busy with request r1"):
        ring.claim("r2", 0)
    with pytest.raises(Exception, match="does not exist"):
        ring.claim("r2", 2)
    assert ring.cancel("r1", interrupt=True) and not ring.cancel("nobody", interrupt=False)
    with pytest.raises(Interrupted, match="interrupted"):
        slot.wait(timeout=1)
    ring.release(slot)
    done = threading.Event()
    threading.Thread(target=lambda: (ring.shutdown(timeout=5), done.set()), daemon=True).start()
    assert done.wait(5)
    with pytest.raises(Exception, match="being replaced"):
        ring.claim("r3", 1)
    assert all(w.closed for w in ring.windows)
    theirs.close()


# ------------------------------------------------------------------ the generation loop
def one_agent_ring() -> Ring:
    return Ring(make_plan(1, 1, head="head"), 0, [FakeWindow(gives_logits=True)])


def serve(ring: Ring, job: GenerateJob, **kw) -> list[StreamEvent]:
    """Run one job through a Generator on ``ring``; the events it published."""
    published: list[StreamEvent] = []

    async def publish(topic, msg, **_):
        published.append(msg)
        return True

    async def go():
        tasks = Tasks("test")
        gen = Generator("head", lambda: ring, StreamHistory(publish, tasks), tasks, **kw)
        try:
            await gen.serve(job)
        finally:
            gen.close()

    asyncio.run(go())
    return published


def job(max_tokens: int = 8, **kw) -> GenerateJob:
    return GenerateJob(
        request_id="r1",
        plan_id="p1",
        seq_id=0,
        prompt_token_ids=[1, 2, 3],
        sampling=Sampling(max_tokens=max_tokens, temperature=0),
        **kw,
    )


def test_the_head_streams_greedy_tokens_and_ends_with_done():
    ring = one_agent_ring()
    events = serve(ring, job(5))
    assert [e.type for e in events] == [EventType.TOKEN] * 5 + [EventType.DONE]
    assert [e.token_id for e in events[:5]] == [3, 4, 5, 6, 7]  # (pos + 1) % 16 after a 3-token prompt
    assert [e.index for e in events] == list(range(6))
    done = events[-1]
    assert done.finish_reason == "length" and done.token_ids == [3, 4, 5, 6, 7]
    assert "".join(e.text for e in events) == "<3><4><5><6><7>"
    assert len(ring.slots) == 0 and ring.meter.tokens_generated == 5


def test_a_resumed_request_replays_its_tokens_and_streams_only_the_rest():
    ring = one_agent_ring()
    events = serve(ring, job(5, attempt=1, resume_token_ids=[3, 4]))
    assert [e.token_id for e in events if e.type == EventType.TOKEN] == [5, 6, 7]
    assert events[-1].token_ids == [3, 4, 5, 6, 7] and all(e.attempt == 1 for e in events)


def test_an_unexpected_failure_in_a_request_still_ends_its_stream_with_an_error():
    """A bug on the head (here a TypeError, as llama.cpp's 5-argument penalties sampler once raised) ends
    the request with an error event, so the controller frees its sequence instead of waiting forever; the
    head frees it too."""
    ring = one_agent_ring()

    def broken(*args):
        raise TypeError("llama_sampler_init_penalties() takes 5 arguments")

    events = serve(ring, job(), session=broken)
    assert [e.type for e in events] == ["error"] and "TypeError" in events[0].error
    assert len(ring.slots) == 0
    assert [e.type for e in serve(ring, job(2))][-1] == EventType.DONE  # the sequence is free again


def test_a_job_for_another_plan_or_a_busy_sequence_is_an_error_event():
    ring = one_agent_ring()
    other = GenerateJob(request_id="r9", plan_id="p0", prompt_token_ids=[1], sampling=Sampling())
    events = serve(ring, other)
    assert [e.type for e in events] == ["error"] and "not the head of plan p0" in events[0].error
    ring.claim("busy", 0)
    events = serve(ring, job())
    assert [e.type for e in events] == ["error"] and "busy with request busy" in events[0].error


# ------------------------------------------------------------------ plan loading
def test_a_plan_that_fails_to_load_unexpectedly_is_reported_and_the_next_one_loads(smollm2, caplog):
    """An unexpected exception while loading (here llama.cpp raising a RuntimeError) is logged with its
    traceback and reported as the agent's status (``error``): it used to leave the agent "loading" for good,
    the exception lost. The plan offered next still loads after it."""
    fp = fingerprint(smollm2)
    reports: list[tuple] = []
    calls = {"n": 0}

    def open_window(path, w, role, plan, threads, stream_from=None, prefetch_experts=False):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("llama.cpp is broken")
        return FakeWindow(gives_logits=True)

    async def report(state, plan_id=None, detail=None):
        reports.append((state, plan_id, detail))

    async def go():
        loader = PlanLoader(
            "head",
            threads=1,
            key=None,
            source=ModelSource("127.0.0.1"),
            release=None,
            tasks=Tasks("test"),
            report=report,
            controller_api=lambda: None,
            open_window=open_window,
        )
        whole = dict(model_path=str(smollm2), fp=fp, n_layers=30)
        await asyncio.wait_for(loader.offer(make_plan(1, 1, **whole)), 60)
        await asyncio.wait_for(loader.offer(make_plan(1, 1, **whole).model_copy(update={"plan_id": "p2"})), 60)
        return loader.ring

    with caplog.at_level(logging.ERROR, logger="homering.agent"):
        ring = asyncio.run(go())
    states = [(s, p) for s, p, _ in reports]
    assert states == [
        (AgentState.LOADING, "p1"),
        (AgentState.ERROR, "p1"),
        (AgentState.LOADING, "p2"),
        (AgentState.READY, "p2"),
    ], reports
    error = next(d for s, _, d in reports if s == AgentState.ERROR)
    assert "RuntimeError" in error and "llama.cpp is broken" in error
    assert any(r.exc_info for r in caplog.records)  # the traceback is in the log
    assert ring is not None and ring.plan.plan_id == "p2"
    ring.close()


def test_a_load_offered_while_another_runs_waits_for_it_and_the_older_one_stops(smollm2):
    """Loads never overlap: a plan offered while one loads waits for it; the older, superseded one stops
    at its next step (it loaded nothing) and only the newest is reported ready."""
    reports: list[tuple] = []
    started = threading.Event()

    def open_window(path, w, role, plan, threads, stream_from=None, prefetch_experts=False):
        started.set()
        time.sleep(0.3)
        return FakeWindow(gives_logits=True)

    async def report(state, plan_id=None, detail=None):
        reports.append((state, plan_id))

    async def go():
        tasks = Tasks("test")
        loader = PlanLoader(
            "head",
            threads=1,
            key=None,
            source=ModelSource("127.0.0.1"),
            release=None,
            tasks=tasks,
            report=report,
            controller_api=lambda: None,
            open_window=open_window,
        )
        plan = make_plan(1, 1, model_path=str(smollm2), fp=fingerprint(smollm2), n_layers=30)
        first = loader.offer(plan)
        await asyncio.to_thread(started.wait, 5)
        second = loader.offer(plan.model_copy(update={"plan_id": "p2"}))
        await asyncio.wait_for(asyncio.gather(first, second), 30)
        return loader.ring

    ring = asyncio.run(go())
    assert reports[-1] == (AgentState.READY, "p2") and (AgentState.READY, "p1") not in reports
    assert ring.plan.plan_id == "p2"
    ring.close()

"""Planner and wire format: pure functions, exhaustively."""

from __future__ import annotations

import numpy as np
import pytest

from homering.controller.plans import make_plan
from homering.planner.model import ModelShape
from homering.planner.proportional import split_proportional
from homering.wire import (
    HEADER,
    AgentProfile,
    DeviceProfile,
    Frame,
    FrameError,
    FrameHeader,
    GenerateJob,
    MalformedMessage,
    Plan,
)


def profile(name, ram):
    device = DeviceProfile(
        os="linux",
        ram_gib=ram / (1 << 30),
        disk_gbps=1.0,
        cpu_ms_per_layer=1.0,
        cpu_ms_output=1.0,
        link_ms=0.1,
        link_mbps=1000.0,
    )
    return AgentProfile(
        name=name,
        host="127.0.0.1",
        data_port=1000,
        pid=1,
        os="linux",
        cpu_count=2,
        threads=2,
        ram_total=ram,
        ram_available=ram,
        device=device,
    )


SHAPE = ModelShape(n_layers=30, layer_bytes=1 << 20, kv_bytes_per_layer=0, output_bytes=1 << 20, hidden_bytes=2304)


@pytest.mark.parametrize(
    "weights,total", [([1, 1, 1], 30), ([8, 1, 1], 30), ([1, 2], 3), ([5, 5, 5, 5], 4), ([0, 0], 7), ([3, 1, 1], 2)]
)
def test_split_proportional(weights, total):
    counts = split_proportional(weights, total)
    assert sum(counts) == total
    if total >= len(weights):
        assert min(counts) >= 1
    if sum(weights) and total >= len(weights):
        ideal = [total * w / sum(weights) for w in weights]
        assert all(abs(c - i) <= len(weights) for c, i in zip(counts, ideal))


def test_plan_is_contiguous_with_head_last():
    plan = make_plan(
        [profile("b", 4 << 30), profile("a", 2 << 30), profile("c", 2 << 30)],
        SHAPE,
        model_path="/m.gguf",
        model_fingerprint="f",
        n_ctx=512,
        planner="proportional",
    )
    assert [a.name for a in plan.ring] == ["a", "c", "b"]  # head (most RAM) closes the ring
    spans = [(a.windows[0].start, a.windows[0].end) for a in plan.ring]
    assert spans[0][0] == 0 and spans[-1][1] == 30
    assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    assert spans == [(0, 8), (8, 16), (16, 30)]  # 1 each, then 27 split 2:2:4 by largest remainder
    assert Plan.load(plan.dump(None), key=None) == plan


def test_frame_roundtrip_and_validation():
    hidden = np.arange(6, dtype=np.float32).reshape(2, 3)
    f = Frame.forward(7, 0, 12, hidden)
    raw = b"".join(bytes(p) for p in f.encode())
    h = FrameHeader.unpack(raw[: HEADER.size])
    assert (h.request_id, h.pos, h.n_tokens, h.n_embd, h.payload_len) == (7, 12, 2, 3, 24)
    assert np.frombuffer(raw[HEADER.size :], dtype=np.float32).tolist() == hidden.ravel().tolist()
    with pytest.raises(FrameError, match="magic"):
        FrameHeader.unpack(b"XXXX" + raw[4 : HEADER.size])
    bad = FrameHeader(h.kind, h.dtype, 7, 0, 0, 12, 2, 3, 20).pack()  # payload size does not match
    with pytest.raises(FrameError, match="payload"):
        FrameHeader.unpack(bad)
    huge = FrameHeader(h.kind, h.dtype, 7, 0, 0, 12, 1 << 20, 3, (1 << 20) * 12).pack()
    with pytest.raises(FrameError, match="too large"):
        FrameHeader.unpack(huge)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"request_id": "x"}',
        b'{"request_id": "a b", "plan_id": "p", "prompt_token_ids": [1], "sampling": {}}',
        b'{"request_id": "a", "plan_id": "p", "prompt_token_ids": [], "sampling": {}}',
    ],
)
def test_malformed_job_is_rejected(payload):
    with pytest.raises(MalformedMessage):
        GenerateJob.load(payload, key=None)


def _on_tmpfs(path) -> bool:
    best = ("", "")
    with open("/proc/mounts") as f:
        for line in f:
            _, point, fstype = line.split()[:3]
            if str(path).startswith(point) and len(point) > len(best[0]):
                best = (point, fstype)
    return best[1] in ("tmpfs", "ramfs", "overlay")


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="needs posix_fadvise (Linux)")
def test_window_pages_release_drops_mapped_pages_and_prefetch_reads_them(tmp_path):
    """release() must drop pages even while another mapping (llama.cpp's) holds them; prefetch() reads them."""
    import mmap
    import time

    from homering.engine.pages import WindowPages, mappings_of, resident_bytes

    if _on_tmpfs(tmp_path):
        pytest.skip("the page cache of tmpfs cannot be dropped")
    path = tmp_path / "window.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4 << 20))
    pages = WindowPages(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        assert sum(mm[i] for i in range(0, len(mm), mmap.PAGESIZE)) >= 0  # fault every page in
        assert resident_bytes(path) == 4 << 20
        assert mappings_of(path)  # the mapping is found in /proc/self/maps
        pages.release()
        assert resident_bytes(path) == 0  # a plain fadvise(DONTNEED) would leave the mapped pages
        pages.prefetch()
        deadline = time.monotonic() + 5
        while resident_bytes(path) < (4 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resident_bytes(path) == 4 << 20
    pages.close()


def test_bench_cluster_summary_checks_the_targets():
    """The headline's ratios and target checks come from the runs, not from the plan alone."""
    from homering.bench.cluster import summarize

    def run(ms, ttft, pressure, pred=None):
        return {"ms_per_token": ms, "ttft_ms": ttft, "memory_pressure": pressure, "predicted_ms_per_token": pred}

    runs = {
        "single": run(5000.0, 30000.0, {"d3": 0.04}),
        "memory": run(900.0, 9000.0, {"d1": 0.05, "d3": 0.08}),
        "halda": run(600.0, 8000.0, {"d1": 0.06, "d3": 0.12}, pred=700.0),
        "halda_one_batch": run(610.0, 10000.0, {"d1": 0.06}),
        "halda_release": run(630.0, 8000.0, {"d1": 0.06}),
        "halda_no_release": run(600.0, 8000.0, {"d1": 0.06}),
    }
    s = summarize({"runs": runs})
    assert s["halda_speedup_vs_single"] == pytest.approx(5000 / 600) and s["target_5x_single"]
    assert s["halda_speedup_vs_memory"] == pytest.approx(1.5) and s["target_faster_than_memory"]
    assert s["prediction_error"] == pytest.approx(100 / 600) and s["target_prediction_25pct"]
    assert s["max_memory_pressure"] == pytest.approx(0.12) and not s["target_pressure_10pct"]
    assert s["prefill_ttft_micro_over_one_batch"] == pytest.approx(0.8)
    assert s["release_ms_per_token_ratio"] == pytest.approx(1.05)
    runs["halda"] = run(1200.0, 8000.0, {"d1": 0.05}, pred=800.0)
    s = summarize({"runs": runs})
    assert not s["target_5x_single"] and not s["target_faster_than_memory"] and not s["target_prediction_25pct"]


def test_malloc_arenas_can_be_limited():
    """glibc takes the agent's arena limit (mallopt returns 1); a fresh process, since it applies process-wide."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", "from homering.engine.pages import limit_malloc_arenas as f; print(f(1))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stdout.split() == ["True"], r.stderr


def _fake_controller_metrics():
    """The controller's metrics over a stand-in controller: agents a and b in the plan's ring, c up but
    dropped from the plan (its stats carry no plan, or an older one), d gone (its retained stats remain)."""
    from types import SimpleNamespace as NS

    from homering.api.metrics import Metrics
    from homering.wire import AgentStats, WindowStats

    def stats(name, plan_id, rss, start=0, end=10):
        windows = [WindowStats(start=start, end=end, forwards=3, tokens=30, compute_ms=120.0)] if plan_id else []
        return AgentStats(name=name, plan_id=plan_id, windows=windows, rss_bytes=rss)

    controller = NS(
        live_agents=lambda: [NS(name=n) for n in "abc"],
        plan=NS(plan_id="p2", ring=[NS(name="a"), NS(name="b")], predicted_ms_per_token=250.0),
        sequences=NS(queue_depth=0),
        in_flight={},
        ready=True,
        agent_stats={
            "a": stats("a", "p2", 100 << 20),
            "b": stats("b", "p2", 200 << 20, 10, 30),
            "c": stats("c", "p1", 50 << 20),
            "d": stats("d", "p1", 70 << 20),
        },
    )
    m = Metrics(controller)
    done = NS(
        type="done",
        finish_reason="stop",
        token_ids=[1, 2, 3],
        prompt_token_ids=[4, 5],
        ttft_ms=80.0,
        ms_per_token=240.0,
    )
    m.finished(done, 1.5)
    return m.exposition().decode()


def test_metrics_cover_every_agent_up_and_name_units_in_seconds():
    """RSS for every agent that is up, in the plan or not; window timings only for the current plan's; the
    predicted token time in seconds (promtool rejects abbreviated units such as ``ms`` in a name)."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(_fake_controller_metrics()) for s in f.samples]
    rss = {s.labels["agent"]: s.value for s in samples if s.name == "homering_agent_rss_bytes"}
    assert rss == {"a": 100 << 20, "b": 200 << 20, "c": 50 << 20}
    assert {s.labels["agent"] for s in samples if s.name == "homering_window_compute_seconds_total"} == {"a", "b"}
    assert [s.value for s in samples if s.name == "homering_agents_up"] == [3]
    assert [s.value for s in samples if s.name == "homering_predicted_seconds_per_token"] == [0.25]
    assert not [s for s in samples if "_ms" in s.name]


def test_metrics_exposition_passes_promtool():
    """Every family, with samples, passes `promtool check metrics` (the live cluster's output: test_api.py)."""
    import shutil
    import subprocess

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships it; see the Makefile)")
    out = subprocess.run(
        [promtool, "check", "metrics"], input=_fake_controller_metrics(), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_cluster_bench_keeps_the_window_disk_to_one_run(tmp_path):
    """Each run's window files are counted at their peak, then removed (a 32B run would otherwise fill the disk)."""
    from homering.bench.disk import WindowDisk

    homes = [tmp_path / "controller", tmp_path / "d1"]
    disk = WindowDisk(homes, interval=0.01)
    for i, home in enumerate(homes):
        (home / "windows" / "sha256").mkdir(parents=True)
        (home / "windows" / "sha256" / f"{i}.gguf").write_bytes(b"x" * 1000 * (i + 1))
    (tmp_path / "d1" / "profile.json").write_text("{}")  # not a window: stays
    with disk.run():
        assert disk.total() == 3000
    assert disk.peak_bytes == 3000
    assert disk.total() == 0 and not (tmp_path / "d1" / "windows").exists()
    assert (tmp_path / "d1" / "profile.json").exists()
    with disk.run():  # a smaller run later keeps the peak
        (tmp_path / "d1" / "windows").mkdir()
        (tmp_path / "d1" / "windows" / "w.gguf").write_bytes(b"x" * 10)
    assert disk.peak_bytes == 3000 and disk.total() == 0


def test_peer_runs_read_decode_time_from_llama_cpps_perf_line(tmp_path, monkeypatch):
    """prima.cpp and llama.cpp print the same perf lines; decode is `eval time`, not `prompt eval time`."""
    from homering.bench.peers import eval_ms_per_token, even_split, parse_peers, peer_binaries
    from homering.errors import HomeringError

    log = (
        "llama_perf_context_print: prompt eval time =      35.20 ms /    14 tokens (    2.51 ms per token,   397 t/s)\n"
        "llama_perf_context_print:        eval time =    2710.93 ms /   127 runs   (   21.35 ms per token,    46 t/s)\n"
    )
    assert eval_ms_per_token(log) == 21.35
    with pytest.raises(HomeringError, match="no 'eval time' line"):
        eval_ms_per_token("prompt eval time = 1.0 ms / 3 tokens (0.33 ms per token)\nsegfault\n")
    assert even_split(30, 3) == [10, 10, 10] and even_split(32, 3) == [11, 11, 10]
    assert parse_peers("prima, rpc") == ["prima", "rpc"] and parse_peers(None) == []
    with pytest.raises(HomeringError, match="unknown peer"):
        parse_peers("prima,exo")
    monkeypatch.delenv("PRIMA_CLI", raising=False)
    with pytest.raises(HomeringError, match="make peers"):
        peer_binaries(["prima"], env_file=tmp_path / "missing.sh")
    exe = tmp_path / "llama-cli"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    env = tmp_path / "env.sh"
    env.write_text(f"# source this file\nexport PRIMA_CLI={exe}              # one process per rank\n")
    assert peer_binaries(["prima"], env_file=env) == {"PRIMA_CLI": str(exe)}

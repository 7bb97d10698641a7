"""Planner and wire format: pure functions, exhaustively."""

from __future__ import annotations

import os
import shutil
import subprocess

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
        "halda": run(600.0, 8000.0, {"d1": 0.05, "d3": 0.07}, pred=660.0),
        "halda_k1": run(900.0, 9000.0, {"d1": 0.05}),
        "halda_one_batch": run(610.0, 10000.0, {"d1": 0.06}),
        "halda_release": run(630.0, 8000.0, {"d1": 0.06}),
        "halda_no_release": run(600.0, 8000.0, {"d1": 0.06}),
    }
    s = summarize({"runs": runs})
    assert s["halda_speedup_vs_single"] == pytest.approx(5000 / 600) and s["target_2_5x_single"]
    assert s["halda_speedup_vs_memory"] == pytest.approx(1.5) and s["target_faster_than_memory"]
    assert s["halda_speedup_vs_k1"] == pytest.approx(1.5) and s["target_faster_than_k1"]
    assert s["prediction_error"] == pytest.approx(0.1) and s["target_prediction_15pct"]
    # the single-device baseline's pressure is reported beside, not held to the target
    assert s["max_memory_pressure"] == pytest.approx(0.08) and not s["target_pressure_6pct"]
    assert s["single_memory_pressure"] == pytest.approx(0.04)
    assert s["prefill_ttft_micro_over_one_batch"] == pytest.approx(0.8)
    assert s["release_ms_per_token_ratio"] == pytest.approx(1.05)
    runs["halda"] = run(2500.0, 8000.0, {"d1": 0.05}, pred=2100.0)
    runs["memory"] = run(900.0, 9000.0, {"d1": 0.05})
    s = summarize({"runs": runs})
    assert not s["target_2_5x_single"] and not s["target_faster_than_memory"] and not s["target_faster_than_k1"]
    assert s["prediction_error"] == pytest.approx(-0.16) and not s["target_prediction_15pct"]
    assert s["max_memory_pressure"] == pytest.approx(0.05) and s["target_pressure_6pct"]


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
        drafted=4,  # speculative decoding's counters appear in the exposition (and pass promtool)
        accepted=3,
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
    """The controller and the devices share one window store: a file made through one home is found through
    another and counted once; each run's files are counted at their peak, then removed (a 32B run took twice
    the model before, 45 GB)."""
    from homering.bench.disk import WindowDisk

    homes = [tmp_path / "controller", tmp_path / "d1"]
    disk = WindowDisk(tmp_path / "store", interval=0.01)
    for home in homes:
        (home / "windows").mkdir(parents=True)  # an earlier bench's own folder: replaced by the link
        disk.share(home)
    (tmp_path / "d1" / "profile.json").write_text("{}")  # not a window: stays
    with disk.run():
        (homes[0] / "windows" / "fp").mkdir()
        (homes[0] / "windows" / "fp" / "w.gguf").write_bytes(b"x" * 3000)
        assert (homes[1] / "windows" / "fp" / "w.gguf").read_bytes() == b"x" * 3000
        assert disk.total() == 3000
    assert disk.peak_bytes == 3000
    assert disk.total() == 0 and (tmp_path / "d1" / "windows").is_dir()  # the link still leads to the store
    assert (tmp_path / "d1" / "profile.json").exists()
    with disk.run():  # a smaller run later keeps the peak
        (tmp_path / "d1" / "windows" / "w.gguf").write_bytes(b"x" * 10)
    assert disk.peak_bytes == 3000 and disk.total() == 0


def test_slicing_remembers_the_hash_it_wrote(smollm2, tmp_path):
    """The slicer hashes a window as it writes it: the memo is the file's real SHA-256 (hashed again after
    the memo is gone), so the controller never reads a fresh window back to hash it."""
    from homering.models.filehash import file_sha256, forget
    from homering.models.slicing import Role, WindowSpec, slice_window

    path = slice_window(smollm2, WindowSpec(0, 3, Role.FIRST), out=tmp_path / "w.gguf", progress=False)
    memo = path.with_name(path.name + ".sha256")
    remembered = memo.read_text().split()[0]
    forget(path)
    assert not memo.exists()
    assert file_sha256(path) == remembered


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


def _peer_plan(ring):
    """A plan as a dict (what the halda run's JSON keeps): ``ring`` is ``[(name, [(start, end), …]), …]``."""
    n = max(end for _, ws in ring for _, end in ws)
    agents = [{"name": a, "windows": [{"start": s, "end": e, "round": i} for i, (s, e) in enumerate(ws)]}
              for a, ws in ring]  # fmt: skip
    return {"n_layers": n, "ring": agents}


def test_prima_same_windows_puts_homerings_head_on_rank_0_and_keeps_every_window():
    """prima.cpp gives each round's layers to ranks 1 … n-1, then rank 0 (its `this_layer_is_mine`), and rank 0
    samples: homering's head, the ring's last device, is rank 0 and ring[i] is rank i + 1."""
    from homering.bench.cluster_peers import plan_layers, prima_layers, prima_windows
    from homering.errors import HomeringError

    plan = _peer_plan([("a", [(0, 4), (10, 14)]), ("b", [(4, 8), (14, 18)]), ("head", [(8, 10), (18, 20)])])
    ranks, lw = prima_windows(plan)
    assert ranks == ["head", "a", "b"] and lw == [2, 4, 4]
    assert prima_layers(20, lw) == [[(8, 10), (18, 20)], [(0, 4), (10, 14)], [(4, 8), (14, 18)]]
    mine = plan_layers(plan)
    assert all(mine[d] == prima_layers(20, lw)[r] for r, d in enumerate(ranks))
    assert prima_layers(7, [1, 2, 2]) == [[(4, 5)], [(0, 2), (5, 7)], [(2, 4)]]  # the last round cut short
    real = make_plan(
        [profile("b", 4 << 30), profile("a", 2 << 30), profile("c", 2 << 30)],
        SHAPE,
        model_path="/m.gguf",
        model_fingerprint="f",
        n_ctx=512,
        planner="proportional",
    ).model_dump()
    ranks, lw = prima_windows(real)
    assert ranks == ["b", "a", "c"] and lw == [14, 8, 8]
    assert [plan_layers(real)[d] for d in ranks] == prima_layers(30, lw)
    with pytest.raises(HomeringError, match="differ in size"):
        prima_windows(_peer_plan([("a", [(0, 4), (8, 9)]), ("b", [(4, 8), (9, 10)])]))


def test_peer_oom_is_read_from_the_devices_memory_cgroup_and_sigkill(tmp_path):
    """A peer run killed by a device's memory limit is OOM: the cgroup's oom_kill count rose (v2 memory.events,
    v1 memory.oom_control), or one of its processes died of SIGKILL on its own."""
    from types import SimpleNamespace

    from homering.bench.cluster_peers import OomWatch
    from homering.testbed.limits import oom_kills

    v2, v1 = tmp_path / "d1", tmp_path / "d2-big"
    v2.mkdir()
    v1.mkdir()
    (v2 / "memory.max").write_text("1000\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (v1 / "memory.limit_in_bytes").write_text("1000\n")
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    dirs = {"d1": v2, "d2-big": v1}
    watch = OomWatch(lambda d: oom_kills(d, [dirs[d]]), ["d1", "d2-big"])
    assert watch.before == {"d1": 1, "d2-big": 0}
    assert watch.killed() == []
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 1\noom_kill 1\n")
    assert watch.killed() == ["d2-big"]
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    died = {"d2-big-client": SimpleNamespace(returncode=-9), "d1": SimpleNamespace(returncode=1)}
    assert watch.killed(died) == ["d2-big"]  # SIGKILL counts; an ordinary failure does not


def _peer_runs(tmp_path):
    from types import SimpleNamespace

    from homering.bench.cluster_peers import PeerRuns

    addresses = {"d1": "10.9.0.2", "d2": "10.9.0.3", "d3": "10.9.0.4"}
    ram = {"d1": 300 << 20, "d2": 600 << 20, "d3": 1400 << 20}
    tb = SimpleNamespace(devices=list(addresses), address=addresses.get, memory_limit=ram.get, workdir=tmp_path)
    bench = SimpleNamespace(
        tb=tb, model_path=tmp_path / "m.gguf", n_ctx=320, tokens=16, largest_device=lambda: "d3", prompt=[1, 2]
    )
    bins = {"PRIMA_CLI": "prima", "LLAMACPP_RPC_SERVER": "rpc-server", "LLAMACPP_COMPLETION": "completion"}
    return PeerRuns(bench, bins, prompt="The history")


def test_peer_command_lines_in_the_testbed(tmp_path):
    """prima.cpp: rank 0 on the head with the prompt, each rank's --next the following rank's device, -lw only
    when given; RPC: a server per device on 0.0.0.0, the head's last, the split by the devices' RAM limits."""
    peers = _peer_runs(tmp_path)
    ranks = peers.ranks()
    assert ranks == ["d3", "d1", "d2"]
    rank0 = peers.prima_argv(ranks, 0, [2, 4, 4])
    assert rank0[:2] == ["prima", "-m"] and "--prefetch" in rank0
    expect = {"--world": "3", "--rank": "0", "--master": "10.9.0.4", "--next": "10.9.0.2", "-lw": "2,4,4"}
    expect |= {"-c": "320", "-n": "16", "-p": "The history", "--temp": "0"}
    assert {flag: rank0[rank0.index(flag) + 1] for flag in expect} == expect
    last = peers.prima_argv(ranks, 2, None)
    assert last[last.index("--next") + 1] == "10.9.0.4" and last[last.index("--master") + 1] == "10.9.0.4"
    assert "-lw" not in peers.prima_argv(ranks, 0, None) and "-p" not in last
    ring, server, client = peers.rpc_argvs()
    assert ring == ["d1", "d2", "d3"]
    assert server[server.index("-H") + 1] == "0.0.0.0"
    assert client[client.index("--rpc") + 1] == "10.9.0.2:50052,10.9.0.3:50052,10.9.0.4:50052"
    assert client[client.index("--tensor-split") + 1] == "300,600,1400"
    assert client[client.index("-ngl") + 1] == "99" and "-no-cnv" in client


def test_peer_logs_give_ttft_prima_plan_and_what_its_profiler_saw(tmp_path):
    """TTFT of a peer is llama.cpp's `prompt eval time`; prima.cpp's own plan and the RAM its profiler saw come
    from rank 0's log; prima_same_windows needs halda; a Q4_0 model is refused before the testbed is up."""
    from homering.bench.cluster_peers import check_peer_runs
    from homering.bench.peers import prima_own_plan, prima_refused_types, prima_seen_ram_gib, prompt_eval
    from homering.errors import HomeringError
    from homering.models.gguf_file import TensorSource, write_gguf

    log = (
        "| Physical Mem Total (GiB)        | 22.95        | 22.95        | 22.95        \n"
        "Remove device d2 (rank 2) with only 1 layer assigned.\n"
        "----- Allocation Strategy (by HiGHS) -----\n  - k = 1\n  - N Layer Window : 10\n  - N Layer Window : 5\n"
        "Reassign layers to the remaining 2 device(s).\n"
        "----- Allocation Strategy (by HiGHS) -----\n  - k = 2\n  - W = 8\n"
        "d3:\n  - Device Index   : 0\n  - N Layer Window : 5\nd1:\n  - Device Index   : 1\n  - N Layer Window : 3\n"
        "llama_perf_context_print: prompt eval time =    1234.50 ms /   257 tokens (    4.80 ms per token)\n"
        "llama_perf_context_print:        eval time =     300.00 ms /    15 runs   (   20.00 ms per token)\n"
    )
    assert prompt_eval(log) == (1234.5, 257)
    assert prima_seen_ram_gib(log) == [22.95, 22.95, 22.95]
    assert prima_own_plan(log, 3) == {"k": 2, "lw": [5, 3, 0]}
    assert prima_own_plan("eval time = 1 ms / 2 runs", 3) is None and prima_seen_ram_gib("") == []
    with pytest.raises(HomeringError, match="prompt eval"):
        prompt_eval("eval time = 1 ms / 2 runs")
    with pytest.raises(HomeringError, match="select halda"):
        check_peer_runs(["prima_same_windows", "rpc"], tmp_path / "unused.gguf")
    model = tmp_path / "q.gguf"
    tensors = [TensorSource("a", (32,), 2, 18, data=bytes(18)), TensorSource("b", (4,), 0, 16, data=bytes(16))]
    with open(model, "wb") as f:  # a Q4_0 tensor (type 2) and an F32 one (type 0)
        write_gguf(f, [], tensors)
    assert prima_refused_types(model) == ["Q4_0"]
    with pytest.raises(HomeringError, match="refuses Q4_0"):
        check_peer_runs(["halda", "prima"], model)
    check_peer_runs(["halda", "prima_same_windows", "rpc"], model)  # -lw runs do not profile


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare"
)
def test_prima_profiler_sees_the_devices_memory_cgroup(tmp_path):
    """prima.cpp's profiler reads /sys/fs/cgroup/memory.max (and memory.current) at the mount's root: in the view,
    those are the device's cgroup's files (v1 names here), and the host's /sys/fs/cgroup is untouched."""
    from homering.bench.cluster_peers import device_memory_view

    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text("294649856\n")
    (cg / "memory.usage_in_bytes").write_text("1234\n")
    before = sorted(os.listdir("/sys/fs/cgroup"))
    show = ["sh", "-c", "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.current; pwd"]
    out = subprocess.run(device_memory_view(str(cg), show), cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["294649856", "1234", str(tmp_path)]
    assert sorted(os.listdir("/sys/fs/cgroup")) == before


def test_bench_cluster_report_sets_halda_against_the_peers_and_an_oom_run(tmp_path):
    """Halda against prima.cpp and RPC: speed-ups, targets (an OOM peer counts as beaten), prima's pressure beside
    homering's; the table says OOM; with every run OOM there is no chart, the JSON is still written."""
    import json

    from rich.console import Console

    from homering.bench.cluster_report import report, summarize, table

    def run(ms, pressure):
        return {"ms_per_token": ms, "ttft_ms": 10 * ms, "memory_pressure": pressure}

    runs = {
        "halda": run(100.0, {"d1": 0.05}),
        "prima": run(150.0, {"d1": 0.02, "d2": 0.07}),
        "prima_same_windows": run(90.0, {"d1": 0.03}),
        "rpc": {"oom": True, "oom_devices": ["d1"], "memory_pressure": {"d1": 0.97}},
    }
    s = summarize({"runs": runs})
    assert s["halda_speedup_vs_prima"] == pytest.approx(1.5) and s["target_faster_than_prima"]
    assert s["halda_speedup_vs_prima_same_windows"] == pytest.approx(0.9)
    assert not s["target_faster_than_prima_same_windows"]
    assert s["target_faster_than_rpc"] and "halda_speedup_vs_rpc" not in s
    assert s["prima_max_memory_pressure"] == pytest.approx(0.07)
    results = {"model": "m.gguf", "spec": "home4.yaml", "runs": runs}
    console = Console(record=True, width=150)
    console.print(table(results))
    assert "OOM" in console.export_text()
    only_oom = {**results, "runs": {"rpc": runs["rpc"]}}
    report(only_oom, tmp_path / "r.json", Console(quiet=True))
    assert json.loads((tmp_path / "r.json").read_text())["runs"]["rpc"]["oom"] is True
    assert not (tmp_path / "r.png").exists()


def test_devices_on_one_host_profile_one_at_a_time(tmp_path, monkeypatch):
    """With the testbed's lock file set, a device profiles only while no other holds the lock (another process
    cannot take it meanwhile); without it, nothing is locked."""
    import fcntl

    from homering.agent.profiling import PROFILE_LOCK_ENV, profile_lock

    lock = tmp_path / "profile.lock"
    monkeypatch.setenv(PROFILE_LOCK_ENV, str(lock))

    def free() -> bool:
        with open(lock, "a+") as other:  # another open file description: flock conflicts as between processes
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(other, fcntl.LOCK_UN)
            return True

    with profile_lock():
        assert not free()
    assert free()
    monkeypatch.delenv(PROFILE_LOCK_ENV)
    with profile_lock():
        assert free()


def test_the_controller_yields_the_cpu_to_the_ring():
    """The controller lowers its own priority (a fresh process: niceness only ever goes up without root)."""
    import subprocess
    import sys

    code = (
        "import os; from homering.cli.controller import CONTROLLER_NICE, yield_cpu_to_the_ring as y; "
        "before = os.getpriority(os.PRIO_PROCESS, 0); y(); "
        "print(os.getpriority(os.PRIO_PROCESS, 0) - before == min(CONTROLLER_NICE, 19 - before))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["True"], r.stderr

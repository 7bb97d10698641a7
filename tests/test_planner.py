"""Halda and the latency model: exact optimum (against brute force), scenarios, the plan CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from homering.controller.plans import make_plan
from homering.planner import plan_cluster
from homering.planner.halda import solve
from homering.planner.model import GIB, ModelShape, PlanError, evaluate, parse_cluster
from homering.wire import AgentProfile, DeviceProfile, GpuProfile
from tests.brute import brute_force

ROOT = Path(__file__).resolve().parent.parent
PRIMA = ROOT / "examples" / "clusters" / "prima-home4.json"


def dev(name, *, os="linux", ram=64.0, disk=2.0, cpu=10.0, out=5.0, gpu=None, link_ms=1.0, mbps=500.0, head=False):
    return {
        "name": name,
        "os": os,
        "ram_gib": ram,
        "disk_gbps": disk,
        "cpu_ms_per_layer": cpu,
        "cpu_ms_output": out,
        "gpu": gpu,
        "link_ms": link_ms,
        "link_mbps": mbps,
        "head": head,
    }


def spec_of(devices, *, layers=8, layer_gib=1.0, kv=0, out_gib=0.0, hidden=16384, compute=0, compute_vocab=0):
    return parse_cluster(
        {
            "model": {
                "n_layers": layers,
                "layer_bytes": int(layer_gib * GIB),
                "kv_bytes_per_layer": kv,
                "output_bytes": int(out_gib * GIB),
                "hidden_bytes": hidden,
                "compute_bytes": compute,
                "compute_vocab_bytes": compute_vocab,
            },
            "devices": devices,
        }
    )


# ---------------------------------------------------------------- optimality
@st.composite
def clusters(draw):
    n_layers = draw(st.integers(1, 24))
    n_dev = draw(st.integers(1, 4))
    head = draw(st.integers(0, n_dev - 1))
    layer_gib = draw(st.floats(0.05, 1.0))
    devices, gpus = [], 0
    for i in range(n_dev):
        gpu = None
        if gpus < 2 and draw(st.booleans()):
            gpus += 1
            gpu = {
                "vram_gib": draw(st.floats(0.0, 4 * layer_gib)),
                "ms_per_layer": draw(st.floats(0.2, 20.0)),
                "unified": draw(st.booleans()),
            }
        devices.append(
            dev(
                f"d{i}",
                os=draw(st.sampled_from(["linux", "android", "macos"])),
                ram=draw(st.floats(0.0, 1.2 * n_layers * layer_gib)),
                disk=draw(st.floats(0.1, 8.0)),
                cpu=draw(st.floats(0.5, 400.0)),
                out=draw(st.floats(0.0, 50.0)),
                gpu=gpu,
                link_ms=draw(st.floats(0.0, 20.0)),
                mbps=draw(st.floats(5.0, 2000.0)),
                head=i == head,
            )
        )
    compute = draw(st.integers(0, int(0.5 * layer_gib * GIB)))
    return spec_of(
        devices,
        layers=n_layers,
        layer_gib=layer_gib,
        kv=draw(st.integers(0, 1 << 26)),
        out_gib=draw(st.floats(0.0, 2.0)),
        hidden=draw(st.sampled_from([2304, 16384, 32768])),
        compute=compute,
        compute_vocab=compute + draw(st.integers(0, int(0.5 * layer_gib * GIB))),
    )


def _bare(name, ram, *, os="linux", head=False):
    """A device that costs 1 ms per layer, reads 1 GB/s and sends hidden states over a 5 Mbit/s link."""
    return dev(name, os=os, ram=ram, disk=1.0, cpu=1.0, out=0.0, link_ms=0.0, mbps=5.0, head=head)


# Found by hypothesis: HiGHS cut off the optimum (one layer more on the device with RAM) and called the worse
# plan optimal while the program's memory rows were in KiB with a 1-byte vocabulary buffer in them.
ONE_BYTE_BUFFER_12 = spec_of(
    [_bare("d0", 11.99250849364324), _bare("d1", 0.0, head=True), _bare("d2", 0.0)],
    layers=12,
    hidden=2304,
    compute_vocab=1,
)
ONE_BYTE_BUFFER_15 = spec_of(
    [_bare("d0", 0.0, head=True), _bare("d1", 16.0, os="macos")],
    layers=15,
    layer_gib=0.953125,
    hidden=2304,
    compute_vocab=1,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
@example(ONE_BYTE_BUFFER_12)
@example(ONE_BYTE_BUFFER_15)
def test_halda_matches_brute_force(spec):
    best = brute_force(spec)
    sol = solve(spec)
    assert sol.prediction.ms_per_token == pytest.approx(best.ms_per_token, rel=1e-7, abs=1e-7)
    for k, objective in sol.objectives.items():  # the program's optimum is the model's value of its solution
        assert objective == pytest.approx(sol.per_k[k], rel=1e-6, abs=1e-5)


@pytest.mark.parametrize("spare_bytes", [0, -1])
def test_one_byte_of_ram_decides_the_plan_and_halda_sees_it(spare_bytes):
    """11 layers of 1 GiB and a 1-byte vocabulary buffer fit the Mac's RAM exactly, or miss by one byte (then
    macOS re-reads all of it every token): Halda's optimum is brute force's either way."""
    ram = 11 + (1 + spare_bytes) / GIB
    spec = spec_of(
        [_bare("mac", ram, os="macos"), _bare("head", 0.0, head=True)], layers=12, hidden=2304, compute_vocab=1
    )
    best, sol = brute_force(spec), solve(spec)
    assert sol.prediction.ms_per_token == pytest.approx(best.ms_per_token, rel=1e-9)
    mac = sol.prediction.devices[0]
    if spare_bytes == 0:
        assert (sol.prediction.k, mac.layers_per_round, mac.mode) == (1, 11, "resident")
    else:
        assert mac.layers_per_round * sol.prediction.k < 11


@settings(max_examples=25, deadline=None)
@given(clusters())
def test_reported_breakdown_is_the_model(spec):
    result = plan_cluster(spec)
    p = result.prediction
    ring = spec.ring()
    again = evaluate(spec, p.k, [d.layers_per_round for d in p.devices], [d.gpu_layers_per_round for d in p.devices])
    assert again == p
    assert sum(d.total_ms for d in p.devices) == pytest.approx(p.ms_per_token)
    assert [d.name for d in p.devices] == [d.name for d in ring]
    # the windows tile the layers: round r holds [r·W, (r+1)·W) in ring order
    spans = sorted(w for d in p.devices for w in d.windows)
    assert spans[0][0] == 0 and spans[-1][1] == spec.model.n_layers
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


# ---------------------------------------------------------------- scenarios
def test_a_far_slower_device_is_dropped():
    spec = spec_of([dev("fast", cpu=10), dev("snail", cpu=400), dev("head", cpu=12, head=True)])
    p = solve(spec).prediction
    assert p.dropped == ["snail"]
    assert {d.name: d.layers_per_round for d in p.devices}["snail"] == 0


@pytest.mark.parametrize("os_name", ["linux", "macos"])
def test_little_ram_fast_disk_overflows_on_linux_not_macos(os_name):
    # 12 layers of 1 GiB; "nimble" computes fast but holds 6 layers; its disk re-reads 1 GiB in 107 ms. On
    # Linux an overflowing device re-reads the excess and the 2 streamed layers in flight (STREAMED_LAYERS):
    # 11 layers there cost 110 + 200 + 7 x 107 = 1059 ms against 60 + 6 x 200 = 1260 resident.
    spec = spec_of([dev("nimble", os=os_name, ram=6.0, disk=10.0, cpu=10), dev("head", cpu=200, head=True)], layers=12)
    one_round = solve(spec, ks=[1]).prediction.devices[0]
    any_k = solve(spec).prediction.devices[0]
    if os_name == "linux":  # the page cache keeps 6 GiB; each token re-reads only the rest
        assert one_round.mode == "overflow" and one_round.layers_per_round > 6
    else:  # macOS re-reads the whole mapping once it overflows: keep only what fits, or stream
        assert one_round.mode in ("resident", None) and one_round.layers_per_round <= 6
        assert any_k.mode != "overflow"


def test_shrinking_ram_moves_to_several_rounds_with_streaming():
    # 8 layers of 1 GiB on two slow devices: while one computes, the other's disk has time to read.
    devices = [dev("a", ram=16, cpu=600), dev("b", ram=16, cpu=600, head=True)]
    roomy = solve(spec_of(devices)).prediction
    assert roomy.k == 1 and {d.mode for d in roomy.in_use} == {"resident"}
    tight_spec = spec_of([{**d, "ram_gib": 3.0} for d in devices])
    tight = solve(tight_spec).prediction
    assert tight.k > 1
    assert "stream" in {d.mode for d in tight.in_use}
    assert tight.ms_per_token < solve(tight_spec, ks=[1]).prediction.ms_per_token


def test_gpu_layers_fill_the_vram():
    gpu = {"vram_gib": 3.0, "ms_per_layer": 1.0, "unified": False}
    p = solve(spec_of([dev("gpu-box", cpu=50, gpu=gpu), dev("head", cpu=50, head=True)])).prediction
    box = p.devices[0]
    assert box.gpu_layers_per_round == 3  # 3 GiB of VRAM, 1 GiB per layer
    # with two rounds the same VRAM holds 3 layers in total, so at most 1 per round
    two = solve(spec_of([dev("gpu-box", cpu=50, gpu=gpu), dev("head", cpu=50, head=True)]), ks=[2]).prediction
    assert two.devices[0].gpu_layers_per_round == 1
    with pytest.raises(PlanError, match="VRAM"):
        evaluate(spec_of([dev("gpu-box", cpu=50, gpu=gpu), dev("head", cpu=50, head=True)]), 2, [3, 1], [2, 0])


def test_paper_cluster_beats_the_baselines():
    from homering.planner.model import load_cluster

    spec = load_cluster(PRIMA)
    assert spec.model.n_layers == 80 and len(spec.devices) == 4
    halda = plan_cluster(spec, "halda")
    for baseline in ("memory", "proportional"):
        assert halda.prediction.ms_per_token < plan_cluster(spec, baseline).prediction.ms_per_token
    gpu_devices = [d for d in spec.ring() if d.gpu is not None and not d.gpu.unified]
    by_name = {d.name: d for d in halda.prediction.devices}
    for d in gpu_devices:  # layers go to the GPUs first
        assert by_name[d.name].gpu_layers_per_round >= 1


def test_unsatisfiable_inputs_say_why():
    with pytest.raises(PlanError, match="exactly one device must have head=true"):
        spec_of([dev("a"), dev("b")])
    with pytest.raises(PlanError, match="does not divide"):
        plan_cluster(spec_of([dev("a", head=True)], layers=8), ks=[3])
    with pytest.raises(PlanError, match=r"devices\.0\.disk_gbps"):
        spec_of([dev("a", head=True, disk=0)])


# ---------------------------------------------------------------- online: plans from agent profiles
def _agent(name, port, ram_gib, cpu, **kw):
    device = DeviceProfile(
        os="linux",
        ram_gib=ram_gib,
        disk_gbps=2.0,
        cpu_ms_per_layer=cpu,
        cpu_ms_output=1.0,
        link_ms=0.5,
        link_mbps=1000,
        model_fingerprint="f" * 16,
        **kw,
    )
    return AgentProfile(
        name=name,
        host="127.0.0.1",
        data_port=port,
        pid=1,
        os="linux",
        cpu_count=2,
        threads=1,
        ram_total=int(ram_gib * GIB),
        ram_available=int(ram_gib * GIB),
        device=device,
    )


def test_head_is_the_agent_whose_cgroup_leaves_the_most_ram():
    """Agents on one host see the same machine-wide RAM; the measured (cgroup-aware) RAM decides."""
    from homering.controller.plans import head_of

    small, big = _agent("a-phone", 9000, 0.3, 1.0), _agent("b-desktop", 9001, 1.4, 1.0)
    small = small.model_copy(update={"ram_available": 20 * GIB})  # what psutil says on the shared host
    big = big.model_copy(update={"ram_available": 19 * GIB})
    assert head_of([small, big]).name == "b-desktop"
    no_device = small.model_copy(update={"device": None})
    assert head_of([no_device, big.model_copy(update={"device": None})]).name == "a-phone"


def test_a_head_that_drafts_is_the_fastest_agent_with_room_for_the_draft():
    """With a draft model the head drafts every token on its CPU beside its share of the ring: among the agents
    whose RAM holds the draft and the least a head holds of the target (its output head, one layer), the one
    with the least CPU time for a draft and its share is the head; without a draft (or without room for it
    anywhere) the most RAM decides."""
    from homering.controller.plans import devices_from_profiles, head_of, make_plan

    fast, slow_big, fastest_tiny = (
        _agent("a-laptop", 9000, 0.35, 1.0),
        _agent("b-desktop", 9001, 1.4, 1.2),
        _agent("c-phone", 9002, 0.05, 0.5),
    )
    agents = [fast, slow_big, fastest_tiny]
    draft = 100 * (1 << 20)  # 100 MiB: c-phone's 51 MiB cannot hold it
    assert head_of(agents).name == "b-desktop"
    assert head_of(agents, draft).name == "a-laptop"
    assert head_of(agents, 10 * GIB).name == "b-desktop"
    assert head_of(agents, draft, 300 << 20).name == "b-desktop"  # a-laptop's 358 MiB: not a head's share beside it
    d1, d2, d3 = _agent("d1", 9003, 0.21, 0.407), _agent("d2", 9004, 0.45, 0.506), _agent("d3", 9005, 1.16, 0.379)
    assert (
        head_of([d1, d2, d3], 94 << 20, 83 << 20).name == "d1"
    )  # home4's F16 pair: d3 is 7% faster, with 5x the share
    shape = ModelShape(
        n_layers=30, layer_bytes=2_216_448, kv_bytes_per_layer=1 << 20, output_bytes=30_000_000, hidden_bytes=2304
    )
    plan = make_plan(
        agents[:2], shape, model_path="m.gguf", model_fingerprint="f" * 16, n_ctx=512, planner="proportional",
        draft_bytes=draft,
    )  # fmt: skip
    assert plan.ring[-1].name == "a-laptop" and plan.head.name == "a-laptop"
    assert plan.ring[-1].windows[0].end == 30  # the head holds the last layers and the output
    big_output = shape.model_copy(update={"output_bytes": 300 << 20})
    plan = make_plan(
        agents[:2], big_output, model_path="m.gguf", model_fingerprint="f" * 16, n_ctx=512, planner="proportional",
        draft_bytes=draft,
    )  # fmt: skip
    assert plan.head.name == "b-desktop" and plan.ring[-1].mode == "resident"
    devices = devices_from_profiles(agents[:2], draft)  # the draft's mapped pages are not charged to the head
    assert devices[-1].name == "a-laptop" and devices[-1].ram_gib == fast.device.ram_gib


def test_make_plan_builds_the_ring_from_profiles():
    shape = ModelShape(
        n_layers=30, layer_bytes=2_216_448, kv_bytes_per_layer=1 << 20, output_bytes=30_000_000, hidden_bytes=2304
    )
    agents = [
        _agent("b", 9001, 4, 1.0),
        _agent("a", 9000, 8, 1.0, gpu=GpuProfile(vram_gib=1, ms_per_layer=0.1, unified=False)),
        _agent("slow", 9002, 2, 80.0),
    ]
    plan = make_plan(agents, shape, model_path="m.gguf", model_fingerprint="f" * 16, n_ctx=512, ks=[1])
    assert plan.head.name == "a"  # the most RAM
    assert "slow" in plan.dropped and plan.position("slow") is None
    assert plan.k == 1 and plan.predicted_ms_per_token > 0
    starts = [w.start for a in plan.ring for w in a.windows]
    ends = [w.end for a in plan.ring for w in a.windows]
    assert starts[0] == 0 and ends[-1] == 30 and starts[1:] == ends[:-1]
    assert plan.head.windows[0].gpu_layers > 0 and plan.head.mode == "resident"
    proportional = make_plan(
        agents, shape, model_path="m.gguf", model_fingerprint="f" * 16, n_ctx=512, planner="proportional"
    )
    assert len(proportional.ring) == 3 and not proportional.dropped


# ---------------------------------------------------------------- the plan CLI
def _homering(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "homering", *args], capture_output=True, text=True, cwd=cwd)


def test_plan_cli_json_fields():
    r = _homering("plan", "--cluster", str(PRIMA), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) >= {"k", "layers_per_round", "predicted_ms_per_token", "devices", "dropped", "solve_ms"}
    assert [d["name"] for d in doc["devices"]][-1] == "d1-mac-m1"  # the head closes the ring
    total = sum(sum(d["predicted"].values()) for d in doc["devices"])
    assert total == pytest.approx(doc["predicted_ms_per_token"])
    for d in doc["devices"]:
        assert set(d) == {"name", "layers_per_round", "gpu_layers_per_round", "mode", "windows", "predicted"}
        assert len(d["windows"]) == (doc["k"] if d["layers_per_round"] else 0)


def test_plan_cli_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    doc = json.loads(PRIMA.read_text())
    del doc["devices"][2]["ram_gib"]
    bad.write_text(json.dumps(doc))
    r = _homering("plan", "--cluster", str(bad))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "devices.2.ram_gib" in r.stderr
    bad.write_text("{not json")
    r = _homering("plan", "--cluster", str(bad))
    assert r.returncode == 2 and "not JSON" in r.stderr
    r = _homering("plan", "--cluster", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_plan_cli_derives_the_model_from_a_gguf(smollm2, tmp_path):
    r = _homering("plan", "--cluster", str(PRIMA), "--model", str(smollm2), "--ctx", "1024", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sum(d["layers_per_round"] for d in doc["devices"]) * doc["k"] == 30


def test_release_is_asked_only_of_devices_that_stream_several_windows():
    """--release by default only where every window is read once per round anyway: stream mode with k > 1."""
    from homering.planner import wants_release

    assert wants_release("stream", 2) and wants_release("stream", 4)
    assert not wants_release("overflow", 2)  # re-reads only what exceeds the RAM; dropping re-reads more
    assert not wants_release("resident", 2)  # fits: dropping it would re-read it every token
    assert not wants_release("stream", 1)  # one window, needed again at the next token
    assert not wants_release(None, 3)


def test_pipeline_depth_counts_devices_that_can_compute_at_once():
    from homering.controller.plans import pipeline_depth
    from homering.wire import AgentProfile

    def agent(host: str, cpus: int, threads: int) -> AgentProfile:
        return AgentProfile.model_construct(host=host, cpu_count=cpus, threads=threads)

    assert pipeline_depth([agent("127.0.0.1", 2, 1)] * 4) == 2  # 4 agents on a 2-core machine
    assert pipeline_depth([agent(f"10.0.0.{i}", 2, 1) for i in range(4)]) == 4  # 4 machines
    assert pipeline_depth([agent("h", 8, 4)] * 3 + [agent("phone", 4, 4)]) == 3  # 2 fit on h, 1 on the phone
    assert pipeline_depth([agent("h", 1, 4)]) == 1


def test_compute_buffers_and_kv_cache_match_what_llama_cpp_allocates(smollm2, tmp_path):
    """The planner's memory terms against the sizes llama.cpp itself reports for real window contexts:
    compute buffers within 5% (vocabulary windows and plain ones, n_batch 16-256), KV cache exact
    (cells padded to 256)."""
    import re

    from homering.models.gguf_info import inspect_gguf
    from homering.planner.cluster import VOCAB_BYTES_PER_TOKEN, shape_from_gguf

    script = tmp_path / "sizes.py"
    script.write_text(
        "import sys\n"
        "from homering.engine.window import LayerWindow\n"
        "from homering.models.slicing import Role, WindowSpec, slice_window\n"
        "for a, b, batch, ctx in ((0, 10, 64, 320), (10, 20, 16, 320), (10, 20, 256, 1024), (20, 30, 64, 320)):\n"
        "    role = Role.for_range(a, b, 30)\n"
        "    path = slice_window(sys.argv[1], WindowSpec(a, b, role), progress=False)\n"
        "    print(f'== {a} {b} {batch} {ctx}', file=sys.stderr, flush=True)\n"
        "    LayerWindow(path, takes_tokens=role.takes_tokens, gives_logits=role.gives_logits, n_ctx=ctx,\n"
        "                n_batch=batch, n_threads=1, verbose=True).close()\n"
    )
    r = subprocess.run(
        [sys.executable, str(script), str(smollm2)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    runs = re.split(r"^== ", r.stderr, flags=re.M)[1:]
    assert len(runs) == 4
    n_layers = inspect_gguf(smollm2).n_layers
    for run in runs:
        a, b, batch, ctx = map(int, run.split(None, 4)[:4])
        compute = float(re.search(r"sched_reserve: +CPU compute buffer size = +([\d.]+) MiB", run).group(1))
        kv = float(re.search(r"CPU KV buffer size = +([\d.]+) MiB", run).group(1))
        shape = shape_from_gguf(smollm2, ctx, 1, batch)
        vocab = a == 0 or b == n_layers
        tables = VOCAB_BYTES_PER_TOKEN * 49152  # SmolLM2's vocabulary: loaded, not part of the compute buffer
        expect = (shape.compute_vocab_bytes - tables if vocab else shape.compute_bytes) / (1 << 20)
        assert compute == pytest.approx(expect, rel=0.05), (a, b, batch)
        assert kv == pytest.approx((b - a) * shape.kv_bytes_per_layer / (1 << 20), abs=0.01), (a, b, ctx)

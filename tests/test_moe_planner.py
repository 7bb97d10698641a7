"""The planner and the profiler know mixtures of experts (issue 23): memory counts every expert, a streamed
layer reads from disk only the share a token routes to, and that share is measured (mincore), never assumed."""

from __future__ import annotations

import shutil

import pytest

from homering.bench.reads import DecodeReads
from homering.engine.pages import WindowPages
from homering.models.gguf_file import read_gguf
from homering.models.gguf_info import block_index, inspect_gguf
from homering.models.slicing import Role, WindowSpec, slice_window
from homering.planner.cluster import with_read_share
from homering.planner.halda import solve
from homering.planner.model import evaluate, parse_cluster, shape_from_gguf
from homering.profiler.compute import possible_probe_specs, routing_probe_spec
from homering.profiler.experts import measure_model_routing, measure_routing, routing_tokens
from homering.transport.windows import model_facts, model_info
from homering.wire import EventType, ModelFacts, StreamEvent
from tests.brute import brute_force
from tests.test_planner import dev, spec_of


def test_moe_shape_counts_all_bytes_and_the_active_ones(qwen3moe_small, qwen3_small):
    """b is every expert (memory); b_a is attention, router, norms and 2 of the 8 experts; dense: no b_a."""
    gf = read_gguf(qwen3moe_small)
    blk0 = [t for t in gf.tensors if block_index(t.name) == 0]
    experts = sum(t.n_bytes for t in blk0 if "_exps." in t.name)
    rest = sum(t.n_bytes for t in blk0) - experts
    info = inspect_gguf(qwen3moe_small)
    assert (info.n_expert, info.n_expert_used) == (8, 2)
    assert info.layer_bytes[0] == rest + experts
    assert info.layer_active_bytes[0] == pytest.approx(rest + experts * 2 / 8, abs=1)
    assert info.active_bytes < info.size_bytes
    shape = shape_from_gguf(qwen3moe_small, n_ctx=256)
    assert shape.layer_bytes == sum(info.layer_bytes) // 6 and shape.read_share == 1.0
    assert shape.active_layer_bytes == pytest.approx(sum(info.layer_active_bytes) / 6, abs=1)
    dense = shape_from_gguf(qwen3_small, n_ctx=256)
    assert (
        dense.active_layer_bytes is None
        and inspect_gguf(qwen3_small).active_bytes == inspect_gguf(qwen3_small).size_bytes
    )
    # the measured shares: the largest of each counts, only for a MoE
    both = with_read_share(shape, [None, (0.3, 0.5, 0.02), (0.45, 0.4, 0.01)])
    assert (both.read_share, both.hot_share, both.novel_share) == (0.45, 0.5, 0.02)
    none = with_read_share(shape, [None])
    assert (none.read_share, none.hot_share, none.novel_share) == (1.0, 1.0, 0.0)
    assert with_read_share(dense, [(0.3, 0.5, 0.02)]).read_share == 1.0


def _moe_spec(share: float, *, ram: float, layers: int = 8, hot: float = 1.0, novel: float = 0.0):
    spec = spec_of(
        [dev("a", ram=ram, cpu=60, disk=1.0), dev("head", ram=ram, cpu=60, disk=1.0, head=True)], layers=layers
    )
    raw = spec.model_dump()
    raw["model"] |= {
        "active_layer_bytes": raw["model"]["layer_bytes"] // 4,
        "read_share": share,
        "hot_share": hot,
        "novel_share": novel,
    }
    return parse_cluster(raw)


@pytest.mark.parametrize("ram", [3.0, 5.5])  # streaming (several rounds), or overflowing on Linux
def test_disk_terms_read_only_the_routed_share(ram):
    """A streamed or overflowing device reads r of its layers' bytes per token: the disk ms scale by r; memory
    (the modes' RAM tests) does not."""
    full, quarter = _moe_spec(1.0, ram=ram), _moe_spec(0.25, ram=ram)
    overflowing = 0
    for k, w in ((1, [4, 4]), (1, [6, 2]), (2, [2, 2]), (4, [1, 1])):
        a, b = evaluate(full, k, w), evaluate(quarter, k, w)
        assert [d.mode for d in a.devices] == [d.mode for d in b.devices]
        for x, y in zip(a.devices, b.devices):
            if x.mode == "overflow" and x.disk_ms > 0:
                assert y.disk_ms == pytest.approx(0.25 * x.disk_ms)
                overflowing += 1
            # the bytes read per token (what bench cluster checks against the cgroups' I/O counters)
            assert y.disk_bytes == pytest.approx(0.25 * x.disk_bytes)
            assert (x.disk_bytes > 0) == (x.mode != "resident")
            assert y.compute_ms == x.compute_ms and y.disk_ms <= x.disk_ms
    assert overflowing
    for spec in (full, quarter):  # Halda's program models the same terms: its optimum is brute force's
        assert solve(spec).prediction.ms_per_token == pytest.approx(brute_force(spec).ms_per_token, rel=1e-7)
    fast, slow = solve(quarter).prediction.ms_per_token, solve(full).prediction.ms_per_token
    assert fast < slow if ram < 4 else fast <= slow  # 2 x 5.5 GiB hold the 8 GiB: no disk either way


def test_model_facts_carry_the_experts(qwen3moe_small, tmp_path, monkeypatch):
    """An agent without the model file rebuilds its facts from the controller's ModelFacts: the expert counts
    come across, so it measures the read share (and plans with it) as an agent with the file does."""
    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    info = inspect_gguf(qwen3moe_small)
    facts = ModelFacts.model_validate_json(model_facts(info).model_dump_json())
    back = model_info(facts, str(info.path), info.fingerprint)
    assert (back.n_expert, back.n_expert_used) == (8, 2)
    assert back.layer_active_bytes == info.layer_active_bytes and back.active_bytes == info.active_bytes
    assert back == info
    # the routing probe: the controller serves its window and the text's token ids (windows keep no
    # tokenizer), and an agent without the model measures what one with the file measures
    assert facts.routing_tokens == list(routing_tokens(str(info.path))) and len(facts.routing_tokens) > 40
    spec = routing_probe_spec(info)
    assert spec.role == Role.FIRST and spec in possible_probe_specs(info)
    window = slice_window(qwen3moe_small, spec, progress=False)
    remote = model_info(facts, str(tmp_path / "not-here.gguf"), info.fingerprint)
    there = measure_model_routing(remote, threads=1, windows=lambda _: window, token_ids=facts.routing_tokens)
    here = measure_model_routing(info, threads=1)
    assert there is not None and here is not None
    assert there.hot_share == pytest.approx(here.hot_share, abs=0.02)
    assert measure_model_routing(remote, threads=1, windows=lambda _: window) is None  # no ids: not measured


def test_read_share_is_measured_with_mincore(qwen3moe_small, qwen3_small, tmp_path, monkeypatch):
    """Without the kernel's read-around a MoE window reads about attention + 2 of 8 experts per token, a dense
    one all of itself; with it (what agents run) the figure is whatever the kernel read, at most 1."""
    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    moe = slice_window(qwen3moe_small, WindowSpec(2, 4, Role.MIDDLE), progress=False)
    dense = slice_window(qwen3_small, WindowSpec(2, 4, Role.MIDDLE), progress=False)
    routed = measure_routing(moe, threads=1, tokens=4, random_access=True)
    assert routed is not None
    info = inspect_gguf(qwen3moe_small)
    expected = sum(info.layer_active_bytes[2:4]) / sum(info.layer_bytes[2:4])
    assert expected - 0.05 < routed.read_share < expected + 0.2  # pages, and the pages around a routed expert
    # random hidden states route near uniformly: 48 tokens come back to (almost) every expert
    assert routed.hot_share > 0.9
    whole = measure_routing(dense, threads=1, tokens=2, random_access=True)
    assert whole is not None and whole.read_share > 0.95 and whole.hot_share > 0.95
    model = measure_model_routing(info, threads=1)  # the first layers, real text, read-around on
    assert model is not None and routed.read_share - 0.05 < model.read_share <= 1.0
    assert expected - 0.05 < model.hot_share <= 1.0
    assert model.fault_gbps is not None and model.fault_gbps > 0  # the cold decodes' reads took time


def test_hot_share_sees_tokens_that_route_to_the_same_experts(qwen3moe_small, tmp_path, monkeypatch):
    """A router whose weights are zero gives every expert the same logit, so every token routes to the same
    experts: the hot share falls to what one token touches (attention and 2 of 8 experts), where the real
    router's tokens come back to most experts. The planner then charges the device almost nothing."""
    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    info = inspect_gguf(qwen3moe_small)
    spec = WindowSpec(0, 2, Role.FIRST)
    window = slice_window(qwen3moe_small, spec, progress=False)
    fixed = tmp_path / "fixed-router.gguf"
    shutil.copyfile(window, fixed)
    with open(fixed, "r+b") as f:
        for t in read_gguf(fixed).tensors:
            if t.name.endswith("ffn_gate_inp.weight"):
                f.seek(t.offset)
                f.write(bytes(t.n_bytes))  # zeros in F32 and F16
    ids = list(range(100, 160))
    real = measure_routing(window, threads=1, token_ids=ids, random_access=True)
    same = measure_routing(fixed, threads=1, token_ids=ids, random_access=True)
    assert real is not None and same is not None
    one_token = sum(info.layer_active_bytes[:2]) / sum(info.layer_bytes[:2])
    assert same.hot_share == pytest.approx(one_token, abs=0.05)
    assert real.hot_share > one_token + 0.2
    assert same.novel_share < 0.01  # and a further token reads nothing new


@pytest.mark.parametrize("hot, novel", [(1.0, 0.0), (0.4, 0.0), (0.1, 0.0), (0.4, 0.05), (0.1, 0.05)])
def test_an_overflowing_device_reads_only_the_hot_bytes_beyond_its_ram(hot, novel):
    """An overflowing MoE device needs in RAM only the hot share u of its layers: it reads
    (r/u)·(need - (1-u)·layers - RAM) per token, r·(need - RAM) when u = 1, nothing when the hot bytes fit;
    plus the novelty share ν of its cold bytes, none of which it caches: ν·(1-u)·layers. Halda's program has
    the same terms (brute force)."""
    spec = _moe_spec(0.5, ram=5.5, hot=hot, novel=novel)
    d = evaluate(spec, 1, [6, 2]).devices[0]
    assert d.mode == "overflow"
    uniform = evaluate(_moe_spec(0.5, ram=5.5), 1, [6, 2]).devices[0]
    beyond = uniform.disk_bytes / 0.5  # need - RAM
    cold = (1 - hot) * 6 * spec.model.layer_bytes
    expected = novel * cold + max(0.0, beyond - cold) * 0.5 / hot
    assert d.disk_bytes == pytest.approx(expected)
    assert (d.disk_bytes > 0) == (hot > 0.5 or novel > 0)
    assert solve(spec).prediction.ms_per_token == pytest.approx(brute_force(spec).ms_per_token, rel=1e-7)


def test_a_moe_devices_reads_take_its_fault_read_speed():
    """An overflowing MoE device reads scattered experts by page faults: its disk ms take the measured fault
    read speed (half the disk's here: twice the ms), not the disk's in-order speed; bytes are the same, and a
    dense model's overflow keeps the disk's speed. Halda's program agrees (brute force)."""
    spec = _moe_spec(0.5, ram=5.5, hot=0.4, novel=0.05)
    raw = spec.model_dump()
    for d in raw["devices"]:
        d["fault_gbps"] = 0.5  # the disk's is 1.0
    slow = parse_cluster(raw)
    a, b = evaluate(spec, 1, [6, 2]).devices[0], evaluate(slow, 1, [6, 2]).devices[0]
    assert a.mode == b.mode == "overflow" and a.disk_ms > 0
    assert b.disk_ms == pytest.approx(2 * a.disk_ms) and b.disk_bytes == pytest.approx(a.disk_bytes)
    raw["model"] |= {"active_layer_bytes": None, "read_share": 1.0, "hot_share": 1.0, "novel_share": 0.0}
    dense, dense_fast = parse_cluster(raw), parse_cluster(raw | {"devices": spec.model_dump()["devices"]})
    assert evaluate(dense, 1, [6, 2]).devices[0].disk_ms == evaluate(dense_fast, 1, [6, 2]).devices[0].disk_ms
    assert solve(slow).prediction.ms_per_token == pytest.approx(brute_force(slow).ms_per_token, rel=1e-7)


def test_a_device_takes_the_routing_of_its_own_layers():
    """With each layer's u and ν measured on the whole model, an overflowing device reads the mean ν of the
    layers it holds: the same overflow over the first layers (which route least repetitively) reads more
    than over the last. The model-wide figures (Halda's program) are the means over all layers."""
    spec = _moe_spec(0.5, ram=5.5, hot=0.4, novel=0.05)
    novel = [0.04, 0.04, 0.04, 0.04, 0.04, 0.04, 0.01, 0.01]
    shape = with_read_share(spec.model, [(0.5, 0.4, 0.05)], ([0.4] * 8, novel))
    assert shape.novel_share == pytest.approx(sum(novel) / 8) and shape.hot_share == pytest.approx(0.4)
    assert shape.shares_of([6, 7]) == pytest.approx((0.4, 0.01 * (1 - 0.4)))  # (u, ν·(1-u))
    layered = spec.model_copy(update={"model": shape})
    first = evaluate(layered, 1, [6, 2]).devices[0]  # layers 0-5
    model_wide = {"novel_share": 0.04, "layer_hot_share": None, "layer_novel_share": None}
    flat = evaluate(spec.model_copy(update={"model": shape.model_copy(update=model_wide)}), 1, [6, 2])
    assert first.mode == "overflow" and first.disk_bytes == pytest.approx(flat.devices[0].disk_bytes)
    repetitive = [0.01] * 6 + [0.04] * 2
    swapped = layered.model_copy(update={"model": shape.model_copy(update={"layer_novel_share": repetitive})})
    last = evaluate(swapped, 1, [6, 2]).devices[0]  # layers 0-5 now route repetitively: 4x less
    assert last.disk_bytes == pytest.approx(first.disk_bytes / 4)
    with pytest.raises(ValueError, match="one share in"):
        type(shape).model_validate(shape.model_dump() | {"layer_novel_share": [0.1] * 7})


def test_the_whole_models_routing_is_measured_once_per_layer(qwen3moe_small, qwen3_small, tmp_path, monkeypatch):
    """The controller's per-layer figures: one (u, ν) per layer of the whole model, the first layer's u the
    largest share of the tiny MoE's experts a stream touches, cached per model (a second call decodes
    nothing); a dense model has none."""
    from homering.profiler import experts
    from homering.profiler.device import model_layer_routing

    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    info = inspect_gguf(qwen3moe_small)
    routing = model_layer_routing(info, threads=1)
    if not WindowPages.supported:
        assert routing is None
        return
    assert routing is not None and len(routing.hot_share) == len(routing.novel_share) == info.n_layers
    assert all(0 < u <= 1 for u in routing.hot_share) and all(0 <= v <= 1 for v in routing.novel_share)
    one_token = min(a / b for a, b in zip(info.layer_active_bytes, info.layer_bytes))
    assert max(routing.hot_share) > one_token  # tokens route to more experts than one token's
    monkeypatch.setattr(experts, "_run", lambda *a, **k: pytest.fail("measured again"))
    assert model_layer_routing(info, threads=1) == routing
    assert model_layer_routing(inspect_gguf(qwen3_small), threads=1) is None


def test_bench_reads_per_token_against_the_plan():
    """bench cluster's disk check: bytes read between the first token and the end, per later token, per device
    with an I/O counter, against the plan's ``predicted.disk_bytes``; the error is over all devices."""
    counters: dict[str, int | None] = {"a": 1000, "b": 5000, "c": None}
    reads = DecodeReads(["a", "b", "c"], counters.get)
    counters["a"] = 2000  # prefill's reads (before the first token) are left out
    reads.on_event(StreamEvent(request_id="r", type=EventType.TOKEN, text="", token_id=7))  # a token, no text yet
    counters["a"], counters["b"] = 2000 + 4 * 300, 5000 + 4 * 100
    reads.on_event(StreamEvent(request_id="r", type=EventType.TOKEN, text="y", token_id=8))  # the first snapshots
    counters["a"] += 10_000
    reads.finish(5)
    assert reads.per_token == {"a": (4 * 300 + 10_000) / 4, "b": 100.0}
    plan = {"ring": [{"name": "a", "predicted": {"disk_bytes": 3000.0}}, {"name": "b", "predicted": None}]}
    out = reads.report(plan)
    assert out["devices"]["b"] == {"measured": 100.0, "predicted": 0.0}
    assert out["measured"] == 2900.0 and out["predicted"] == 3000.0
    assert out["error"] == pytest.approx(100 / 2900)


def test_an_overflowing_moe_device_leaves_its_window_to_the_kernel():
    """Dense: an overflowing device keeps a prefix and streams the rest, charged the streamed layers in
    flight. MoE: no prefix kept (the kernel's page cache keeps the experts in use) and only the excess over its
    RAM, times the read share, is re-read."""
    moe = _moe_spec(0.5, ram=5.5)
    raw = moe.model_dump()
    raw["model"] |= {"active_layer_bytes": None, "read_share": 1.0}
    dense = parse_cluster(raw)
    a, b = evaluate(dense, 1, [6, 2]), evaluate(moe, 1, [6, 2])
    x, y = a.devices[0], b.devices[0]
    assert x.mode == y.mode == "overflow"
    assert x.keep_bytes is not None and y.keep_bytes is None
    assert x.disk_bytes - 2 * y.disk_bytes == pytest.approx(2 * dense.model.layer_bytes)
    assert solve(moe).prediction.ms_per_token == pytest.approx(brute_force(moe).ms_per_token, rel=1e-7)

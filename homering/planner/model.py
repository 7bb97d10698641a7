"""The latency model (v1) the planners optimise and report: ms per decoded token.

A plan is ``k`` rounds of ``W = L / k`` layers. In every round each device m in
use runs its window of ``w_m`` layers, ``n_m`` of them on its GPU, then sends
the hidden state on. The model follows PRIMA.CPP (Li et al., arXiv 2504.08791,
§3) with three changes: links cost time, prefetching overlaps disk reads with
the rest of the ring's work (the *stream* mode), and devices are dropped by the
same program that assigns layers.

Symbols (bytes unless noted): ``b`` one layer's weights, ``kv`` one layer's KV
cache at the planned context, ``b' = b + kv``, ``o`` the output norm and head,
``h`` one hidden state per hop, ``c`` llama.cpp's compute buffer of one
window's context at the planned micro-batch, ``c_v`` the same for the windows
that take tokens or give logits (the first and the last: their graphs hold
vocabulary-wide rows).

For device m (ring order = device list, head moved to the end):

- ``comp_m = (w_m - n_m)·cpu_ms_per_layer + n_m·gpu.ms_per_layer``
- ``hop_m = link_ms + 1000·8h / (link_mbps·1e6)`` when two or more devices are
  in use, else 0 (every device in use sends once per round).
- ``s_m = (w_m - n_m)·b'`` (+ ``n_m·b'`` with unified memory): RAM of one window;
  ``a_m = k·c + v_m·(c_v - c)`` the anonymous buffers of its k contexts, where
  ``v_m`` counts its vocabulary windows (the first device in use holds the first
  window, the head the last; with k = 1 a lone head's one window counts once);
  ``need_m = k·s_m + a_m + [head]·o``.
- disk stall per round ``visible_m``, the cheapest open mode:
  *resident* (``need_m <= ram``): 0;
  *overflow*: every token re-reads ``need_m - ram + f·b`` (Linux, Android) or all of
  ``need_m`` (macOS), ``visible = 1000·reread / (disk_gbps·1e9) / k``. On Linux the
  device keeps ``keep_m = k·s_m^w - reread`` bytes of its layers' weights (``s_m^w``:
  one window's weights) and streams the rest
  (:mod:`homering.engine.streaming`): ``f`` (:data:`STREAMED_LAYERS`) streamed layers are
  in memory at a time, beside the kept ones;
  *stream* (open when ``2·s_m + a_m + [head]·o <= ram``):
  ``visible = max(0, 1000·s_m / (disk_gbps·1e9) - slack_m)`` with
  ``slack_m = Σ_{j≠m in use} (comp_j + hop_j)``.

Token latency ``T = k·Σ_{m in use} (comp_m + hop_m + visible_m) + cpu_ms_output(head)``.

**Mixtures of experts** (Qwen3-MoE): memory counts every expert (``b`` is all of a layer's bytes), while a
decoded token reads from disk only the share ``r`` (``read_share``) of a streamed layer's bytes: the pages
of the experts it is routed to, plus the kernel's read-around, as the profiler measures it
(:mod:`homering.profiler.experts`; 1 for a dense model). The disk terms above read ``r·reread`` and
``r·s_m``. An overflowing MoE device keeps no prefix and streams nothing itself: a token touches a few
experts per layer, not the whole window in order, so the kernel's page cache keeps the experts in use
(measured on Qwen3-30B-A3B's shape: the Halda plan 1502 ms/token with the prefix kept and the rest streamed,
178 ms/token left to the kernel). Its tokens keep coming back to the hot share ``u`` (``hot_share``) of the
layers' bytes, so the page cache must hold ``need_m - (1-u)·k·s_m^w`` bytes (the cold experts are never
needed); what exceeds ``ram_m`` misses, and a token's ``r`` of the hot bytes (``r/u`` of them) is read for
each missed byte: ``(r/u)·max(0, need_m - (1-u)·k·s_m^w - ram_m)``. With uniform routing (``u = 1``) that is
``r·(need_m - ram_m)``. Besides, a token sometimes routes to an expert the stream had not used: it reads the
novelty share ``ν`` (``novel_share``) of the cold bytes, and an overflowing device caches none of them,
``ν·(1-u)·k·s_m^w``. (A device at its memory limit reclaims first what was read once and never touched
again, the cold pages its windows brought in at load. Measured on Qwen3-30B-A3B's shape: D3 of home4-32b
holding all 48 layers, 8 GB beyond its RAM, read 5.4 MB per token in three invocations, this term 5.0,
``ν`` times its excess over the RAM 3.2; devices less than 0.5 GB beyond their RAM read between the two
bounds, 0.1-2.3 MB, differently in each invocation.) These reads are the routed experts the device lacks, which
its windows prefetch one layer at a time (:mod:`homering.engine.prefetch`: no fault read-around, which
read 13x more), scattered over the window, slower than reading it in order: they take the device's
measured fault read speed (``fault_gbps``). Where the controller measured each layer's ``u`` and ``ν`` on
the whole model (``layer_hot_share``, ``layer_novel_share``: the first layers route least repetitively,
so the agents' probe of them alone overstates the rest), a device takes the means over its own layers;
Halda's program, which knows how many layers a device holds but not which, the means over all. A model
whose tokens route to a few experts reads little once they are cached. Compute needs no term of its own:
``cpu_ms_per_layer`` is measured on the model's own layers, so a MoE layer's time already counts its active
parameters (attention, router and top-k experts), not all.

The inputs (:class:`ClusterSpec`, :class:`ModelShape`, :class:`Device`) live in
:mod:`homering.planner.cluster` and are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from homering.planner.cluster import (
    GIB,
    ClusterSpec,
    Device,
    ModelShape,
    PlanError,
    load_cluster,
    parse_cluster,
    shape_from_gguf,
)

__all__ = [
    "GIB",
    "MODES",
    "ClusterSpec",
    "Device",
    "DevicePrediction",
    "Mode",
    "ModelShape",
    "PlanError",
    "Prediction",
    "candidate_rounds",
    "check_assignment",
    "divisors",
    "evaluate",
    "load_cluster",
    "parse_cluster",
    "shape_from_gguf",
]

STREAMED_LAYERS = 2
"""``f``: the room an overflowing device keeps for streamed layers, in layers: the one computing
(:mod:`homering.engine.streaming`) and one of margin for the kernel's fault read-around past it."""
Mode = Literal["resident", "overflow", "stream"]
MODES: tuple[Mode, ...] = ("resident", "overflow", "stream")


@dataclass(frozen=True)
class DevicePrediction:
    """One device's share of a plan and its predicted cost per token (ms, summed over the k rounds).

    ``compute_ms`` of the head includes ``cpu_ms_output``, so the three columns
    of all devices add up to the token latency.
    """

    name: str
    layers_per_round: int
    gpu_layers_per_round: int
    mode: Mode | None  # None when the device is dropped
    windows: list[tuple[int, int]]
    compute_ms: float
    disk_ms: float
    hop_ms: float
    keep_bytes: int | None = None  # overflow on Linux/Android: bytes of layer weights kept, the rest streams
    disk_bytes: float = 0.0  # bytes the device reads from disk per token (all k rounds; a MoE's share applied)

    @property
    def total_ms(self) -> float:
        return self.compute_ms + self.disk_ms + self.hop_ms


@dataclass(frozen=True)
class Prediction:
    """A plan evaluated with the latency model: ``ms_per_token`` = T."""

    k: int
    layers_per_round: int
    ms_per_token: float
    devices: list[DevicePrediction]  # ring order, dropped devices included (mode None)

    @property
    def dropped(self) -> list[str]:
        return [d.name for d in self.devices if d.layers_per_round == 0]

    @property
    def in_use(self) -> list[DevicePrediction]:
        return [d for d in self.devices if d.layers_per_round > 0]


def check_assignment(spec: ClusterSpec, k: int, w: list[int], n: list[int]) -> None:
    """Raise :class:`PlanError` unless (k, w, n) satisfies the model's constraints.

    ``w`` and ``n`` are per device in ring order (:meth:`ClusterSpec.ring`).
    """
    ring, shape = spec.ring(), spec.model
    if k < 1 or shape.n_layers % k:
        raise PlanError(f"k={k} does not divide {shape.n_layers} layers")
    if len(w) != len(ring) or len(n) != len(ring):
        raise PlanError("one w and one n per device")
    W = shape.n_layers // k
    if sum(w) != W:
        raise PlanError(f"layers per round add up to {sum(w)}, not W={W}")
    if w[-1] < 1:
        raise PlanError(f"the head {ring[-1].name} must hold at least one layer per round")
    for d, wm, nm in zip(ring, w, n):
        if not 0 <= nm <= wm:
            raise PlanError(f"{d.name}: need 0 <= n <= w, got n={nm}, w={wm}")
        if nm and d.gpu is None:
            raise PlanError(f"{d.name} has no GPU but n={nm}")
        if d.gpu is not None and k * nm * shape.layer_kv_bytes > d.gpu.vram_gib * GIB:
            raise PlanError(f"{d.name}: {nm} GPU layers x {k} rounds exceed {d.gpu.vram_gib} GiB VRAM")


def evaluate(spec: ClusterSpec, k: int, w: list[int], n: list[int] | None = None) -> Prediction:
    """Evaluate the latency model on an assignment; the reference for every planner.

    Args:
        spec: model shape and devices.
        k: rounds; must divide ``n_layers``.
        w: layers per round of each device, in ring order (head last).
        n: GPU layers per round of each device (default none).

    Each device runs in its cheapest open mode (ties: resident, overflow, stream).

    Raises:
        PlanError: the assignment breaks a constraint (see :func:`check_assignment`).
    """
    ring, shape = spec.ring(), spec.model
    n = list(n) if n is not None else [0] * len(ring)
    w = list(w)
    check_assignment(spec, k, w, n)
    W = shape.n_layers // k
    used = [wm > 0 for wm in w]
    multi = sum(used) > 1
    comp = [
        (wm - nm) * d.cpu_ms_per_layer + (nm * d.gpu.ms_per_layer if nm and d.gpu is not None else 0.0)
        for d, wm, nm in zip(ring, w, n)
    ]
    hop = [d.hop_ms(shape.hidden_bytes) if (u and multi) else 0.0 for d, u in zip(ring, used)]
    busy = sum(c + hp for c, hp in zip(comp, hop))
    first = used.index(True)
    devices: list[DevicePrediction] = []
    start, total = 0, 0.0
    for i, (d, wm, nm) in enumerate(zip(ring, w, n)):
        at, start = start, start + wm  # the device's first layer in every round's window
        if not used[i]:
            devices.append(DevicePrediction(d.name, 0, 0, None, [], 0.0, 0.0, 0.0))
            continue
        is_head = i == len(ring) - 1
        windows = [(r * W + at, r * W + at + wm) for r in range(k)]
        mine = [il for lo, hi in windows for il in range(lo, hi)]
        slack = busy - comp[i] - hop[i]
        mode, stall, keep, read = _cheapest_mode(
            shape, d, k, wm, nm, first=i == first, head=is_head, slack=slack, layers=mine
        )
        pred = DevicePrediction(
            name=d.name,
            layers_per_round=wm,
            gpu_layers_per_round=nm,
            mode=mode,
            windows=windows,
            compute_ms=k * comp[i] + (d.cpu_ms_output if is_head else 0.0),
            disk_ms=k * stall,
            hop_ms=k * hop[i],
            keep_bytes=keep if mode == "overflow" else None,
            disk_bytes=k * read,
        )
        devices.append(pred)
        total += pred.total_ms
    return Prediction(k=k, layers_per_round=W, ms_per_token=total, devices=devices)


def _cheapest_mode(
    shape: ModelShape,
    d: Device,
    k: int,
    w: int,
    n: int,
    *,
    first: bool,
    head: bool,
    slack: float,
    layers: list[int] | None = None,
) -> tuple[Mode, float, int | None, float]:
    """Device ``d``'s cheapest open mode (ties: resident, overflow, stream), its disk stall per round (ms),
    in overflow mode on Linux/Android the bytes of layer weights it keeps (else None), and the bytes it reads
    from disk per round in that mode (the stall's bytes before any overlap; a MoE's ``read_share`` applied).

    ``w``/``n``: its layers and GPU layers per round; ``first``: it is the first device in use; ``head``: it
    holds the last window; ``slack``: the rest of the ring's compute and hops per round, ms (the stream mode's
    overlap); ``layers``: the device's layers, for a MoE's per-layer shares (:meth:`ModelShape.shares_of`).
    See the module docstring for ``s_m``, ``a_m``, ``need_m`` and the modes.
    """
    bp = shape.layer_kv_bytes
    s = (w - n) * bp + (n * bp if d.gpu is not None and d.gpu.unified else 0)
    fixed = shape.buffer_bytes(k, shape.vocab_windows(k, first, head)) + (shape.output_bytes if head else 0)
    need = k * s + fixed
    ram, r = d.ram_bytes, shape.read_share
    costs: dict[Mode, float] = {}
    reads: dict[Mode, float] = {"resident": 0.0}
    if need <= ram:
        costs["resident"] = 0.0
    keep = None
    reread: float = need
    rate, novel = r, 0.0  # bytes read per byte re-read; per token besides, bytes of the uncached ones touched
    if d.os != "macos" and shape.active_layer_bytes is not None:  # a MoE: the kernel caches the hot experts
        u, fresh = shape.shares_of(layers)
        cold = (1 - u) * k * (s // bp) * shape.layer_bytes  # bytes its tokens do not come back to
        reread, rate = max(0.0, need - cold - ram), r / u
        novel = fresh * k * (s // bp) * shape.layer_bytes if need > ram else 0.0  # none of them cached
    elif d.os != "macos":
        reread = max(0.0, need - ram) + (STREAMED_LAYERS * shape.layer_bytes if need > ram else 0)
        keep = max(0, int(k * (w - n) * shape.layer_bytes - reread))
    read_ms = d.fault_ms if shape.active_layer_bytes is not None and d.os != "macos" else d.disk_ms
    costs["overflow"], reads["overflow"] = read_ms(rate * reread + novel) / k, (rate * reread + novel) / k
    if 2 * s + fixed <= ram:
        costs["stream"], reads["stream"] = max(0.0, d.disk_ms(r * s) - slack), r * s
    mode = min(MODES, key=lambda m: (costs.get(m, float("inf")), MODES.index(m)))
    return mode, costs[mode], keep, reads[mode]


def divisors(n: int) -> list[int]:
    """The k that divide ``n`` (ascending)."""
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_rounds(n_layers: int, ks: list[int] | None) -> list[int]:
    """The k to plan for: ``ks`` (sorted, deduplicated) or every divisor of ``n_layers``.

    Raises:
        PlanError: a k that does not divide ``n_layers`` (the message lists the ones that do).
    """
    if not ks:
        return divisors(n_layers)
    for k in sorted(set(ks)):
        if k < 1 or n_layers % k:
            raise PlanError(
                f"k={k} does not divide {n_layers} layers (choose from {', '.join(map(str, divisors(n_layers)))})"
            )
    return sorted(set(ks))

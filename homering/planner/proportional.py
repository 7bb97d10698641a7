"""Baseline planners that ignore speed, for comparison with Halda.

- ``proportional``: the walking skeleton's split, layers in proportion to
  available RAM, at least one layer per device (largest-remainder rounding).
- ``memory``: exo's split by memory only (exo-explore/exo,
  ``RingMemoryWeightedPartitioningStrategy``): each device's share of the
  layers is its share of the cluster's memory (RAM plus dedicated VRAM), with
  cumulative rounding, so a small device can get none.

Both use the smallest k offered (1 by default) and put on a device's GPU as many of
its layers as its VRAM holds, as ``-ngl`` would in llama.cpp.
"""

from __future__ import annotations

from homering.planner.model import GIB, ClusterSpec, Device, Prediction, evaluate


def split_proportional(weights: list[float], total: int) -> list[int]:
    """Integers proportional to ``weights`` summing to ``total``, each >= 1 when total allows.

    Largest-remainder rounding (Hamilton's method).
    """
    n = len(weights)
    if n == 0:
        return []
    floor_each = 1 if total >= n else 0
    rest = total - floor_each * n
    wsum = sum(weights)
    ideal = [rest * (w / wsum if wsum else 1.0 / n) for w in weights]
    counts = [int(x) for x in ideal]
    order = sorted(range(n), key=lambda i: ideal[i] - counts[i], reverse=True)
    for i in order[: rest - sum(counts)]:
        counts[i] += 1
    return [c + floor_each for c in counts]


def split_cumulative(weights: list[float], total: int) -> list[int]:
    """Shares by rounding cumulative fractions (exo's partitioning); entries may be 0."""
    wsum = sum(weights) or 1.0
    out, acc, prev = [], 0.0, 0
    for w in weights:
        acc += w
        end = round(total * acc / wsum)
        out.append(end - prev)
        prev = end
    out[-1] += total - prev
    return out


def _gpu_layers(spec: ClusterSpec, k: int, d: Device, w: int) -> int:
    if d.gpu is None:
        return 0
    return min(w, int(d.gpu.vram_gib * GIB // (k * spec.model.layer_kv_bytes)))


def _finish(spec: ClusterSpec, k: int, w: list[int]) -> Prediction:
    ring = spec.ring()
    if w[-1] == 0:  # the head must hold a layer: take one from the largest share
        w[max(range(len(w)), key=lambda i: w[i])] -= 1
        w[-1] = 1
    return evaluate(spec, k, w, [_gpu_layers(spec, k, d, wm) for d, wm in zip(ring, w)])


def plan_proportional(spec: ClusterSpec, ks: list[int] | None = None) -> Prediction:
    """The walking skeleton's split: layers ∝ available RAM, >= 1 each (ring order kept)."""
    k = min(ks or [1])
    W = spec.model.n_layers // k
    return _finish(spec, k, split_proportional([d.ram_gib for d in spec.ring()], W))


def plan_memory(spec: ClusterSpec, ks: list[int] | None = None) -> Prediction:
    """exo's split by memory (RAM + dedicated VRAM); devices may get no layers."""
    k = min(ks or [1])
    W = spec.model.n_layers // k
    mem = [d.ram_gib + (d.gpu.vram_gib if d.gpu is not None and not d.gpu.unified else 0.0) for d in spec.ring()]
    return _finish(spec, k, split_cumulative(mem, W))

"""Brute-force optimum of the latency model: every k, every (w, n); for tests only."""

from __future__ import annotations

import itertools

from homering.planner.model import GIB, ClusterSpec, PlanError, Prediction, divisors, evaluate


def compositions(total: int, parts: int):
    """All tuples of ``parts`` non-negative ints summing to ``total``."""
    for cuts in itertools.combinations(range(total + parts - 1), parts - 1):
        prev, out = -1, []
        for c in cuts:
            out.append(c - prev - 1)
            prev = c
        out.append(total + parts - 1 - prev - 1)
        yield tuple(out)


def brute_force(spec: ClusterSpec) -> Prediction:
    """The minimum of :func:`evaluate` over all feasible (k, w, n)."""
    ring, shape = spec.ring(), spec.model
    best = None
    for k in divisors(shape.n_layers):
        W = shape.n_layers // k
        for w in compositions(W, len(ring)):
            if w[-1] < 1:
                continue
            choices = []
            for d, wm in zip(ring, w):
                if d.gpu is None:
                    choices.append((0,))
                else:
                    cap = int(d.gpu.vram_gib * GIB // (k * shape.layer_kv_bytes))
                    choices.append(tuple(range(min(wm, cap) + 1)))
            for n in itertools.product(*choices):
                try:
                    pred = evaluate(spec, k, list(w), list(n))
                except PlanError:
                    continue
                if best is None or pred.ms_per_token < best.ms_per_token:
                    best = pred
    return best

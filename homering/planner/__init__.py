"""Planners: which device runs which layers, and the predicted ms per token.

A planner maps a :class:`~homering.planner.cluster.ClusterSpec` (model shape
and measured devices) to an assignment evaluated with the latency model
(:func:`~homering.planner.model.evaluate`). ``halda`` is the exact optimum
(PRIMA.CPP §3); ``memory`` (exo) and ``proportional`` (the walking skeleton)
are baselines. The planner knows nothing of the wire: the controller turns agents' profiles into
its devices and its answer into a :class:`~homering.wire.Plan` (:mod:`homering.controller.plans`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from homering.planner import halda
from homering.planner.model import ClusterSpec, PlanError, Prediction, candidate_rounds
from homering.planner.proportional import plan_memory, plan_proportional

__all__ = ["PLANNERS", "PlanResult", "plan_cluster", "wants_release", "DEFAULT_BATCH", "PlanError"]


def _halda(spec: ClusterSpec, ks: list[int]) -> tuple[Prediction, dict[int, float]]:
    sol = halda.solve(spec, ks)
    return sol.prediction, sol.per_k


Planner = Callable[[ClusterSpec, list[int]], tuple[Prediction, dict[int, float]]]
"""``(spec, candidate k) -> (prediction, {k: ms per token of the best plan with that k})``."""


def _baseline(fn: Callable[[ClusterSpec, list[int]], Prediction]) -> Planner:
    def run(spec: ClusterSpec, ks: list[int]) -> tuple[Prediction, dict[int, float]]:
        pred = fn(spec, ks)
        return pred, {pred.k: pred.ms_per_token}

    return run


PLANNERS: dict[str, Planner] = {
    "halda": _halda,
    "memory": _baseline(plan_memory),
    "proportional": _baseline(plan_proportional),
}
"""Planner name -> ``(spec, candidate k) -> (prediction, {k: ms per token of the best plan with that k})``."""


@dataclass(frozen=True)
class PlanResult:
    """A planner's answer: the evaluated assignment, the planner's name, its solve time (ms), T per k tried."""

    prediction: Prediction
    planner: str
    solve_ms: float
    per_k: dict[int, float] = field(default_factory=dict)


def plan_cluster(spec: ClusterSpec, planner: str = "halda", ks: list[int] | None = None) -> PlanResult:
    """Run ``planner`` on ``spec`` over the candidate ``ks`` (default: every divisor of L).

    Raises:
        PlanError: unknown planner, a k that does not divide L, or no feasible plan.
    """
    if planner not in PLANNERS:
        raise PlanError(f"unknown planner {planner!r}: use one of {', '.join(PLANNERS)}")
    ks = candidate_rounds(spec.model.n_layers, ks)
    t0 = time.perf_counter()
    prediction, per_k = PLANNERS[planner](spec, ks)
    return PlanResult(prediction, planner, (time.perf_counter() - t0) * 1000, per_k)


def wants_release(mode: str | None, k: int) -> bool:
    """Whether a device should drop each window from the page cache after use.

    Only in ``stream`` mode with more than one window (k > 1): the latency
    model already reads each of its windows from disk once per round there,
    so dropping the window just used (the one needed last) costs nothing and
    leaves its memory to the prefetch of the next one. In ``overflow`` mode
    the model counts only the bytes beyond the RAM as re-read, and dropping
    whole windows re-reads more: on home4-overflow.yaml (k = 2, two devices
    overflowing) forcing --release was 1.21x slower than not releasing.
    A resident device keeps everything; with k = 1 the only window is needed
    again at the next token.
    """
    return k > 1 and mode == "stream"


DEFAULT_BATCH = 64
"""Tokens per prefill micro-batch, which is also every window's n_batch/n_ubatch (the controller's ``--batch``)."""

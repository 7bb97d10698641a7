"""Halda: the exact optimum of the latency model, one mixed-integer program per k.

PRIMA.CPP (Li et al., arXiv 2504.08791, §3.3) names its layer-assignment
solver Halda and solves one integer program per number of rounds k. This is a
re-derivation for :mod:`homering.planner.model` (links, prefetch overlap, and
device dropping inside the program), written with PuLP and solved with HiGHS
(CBC when HiGHS is missing).

Program for a fixed k (W = L/k, memory in KiB, times in ms; per device m):

- integers ``w_m ∈ [0, W]`` (head ``>= 1``), ``Σ w_m = W``; ``n_m ∈ [0, w_m]``,
  bounded by VRAM (``k·n_m·b' <= vram``), absent without a GPU;
- binary ``u_m`` (in use): ``u_m <= w_m <= W·u_m``; the head's is 1;
  ``z ∈ [0, 1]``, ``z >= u_m`` for every other m, switches the head's hop on;
- binary ``f_m`` (the first device in use, which holds the first window):
  ``f_m >= u_m - Σ_{j<m} u_j``; with the compute buffers
  ``a_m = k·c·u_m + (c_v - c)·v_m``, ``v_m = f_m`` (+ 1 for the head, whose
  ``f`` counts only when k > 1);
- binaries ``res_m + ovf_m + str_m = 1`` choose the disk mode, each guarded by
  its memory condition (``need_m`` includes ``a_m``) with a big-M as tight as
  the bounds allow;
- ``D_m >= 0``, the disk ms per token: ``D_m >= k·visible_m`` of the chosen
  mode, linearised (``max(0, ·)`` by ``D_m >= 0``; the mode by big-M);
- minimise ``k·Σ comp_m + k·(Σ_{m≠head} u_m·hop_m + z·hop_head) + Σ D_m + cpu_ms_output(head)``.

Because every term of T is minimised, the solver picks each device's
cheapest open mode, exactly as the model prescribes. The winning (k, w, n) is
re-evaluated with :func:`~homering.planner.model.evaluate`, so what is reported
is the model itself, not the program's relaxation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pulp

from homering.planner.model import GIB, KIB, ClusterSpec, PlanError, Prediction, candidate_rounds, evaluate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Solution:
    """The best plan over the candidate k, with per-k optima and the solve time (ms)."""

    prediction: Prediction
    per_k: dict[int, float]      # k -> optimal T, ms per token
    solve_ms: float
    solver: str
    objectives: dict[int, float]  # k -> the program's optimal objective (equals per_k up to tolerances)


def _solver(name: str | None = None):
    available = pulp.listSolvers(onlyAvailable=True)
    name = name or ("HiGHS" if "HiGHS" in available else "PULP_CBC_CMD")
    if name not in available:
        raise PlanError(f"MIP solver {name} is not available (have: {', '.join(available) or 'none'})")
    if name == "HiGHS":
        return name, pulp.HiGHS(msg=False, gapRel=0.0, gapAbs=1e-9, threads=1,
                                mip_feasibility_tolerance=1e-9, primal_feasibility_tolerance=1e-9)
    return name, pulp.getSolver(name, msg=False, gapRel=0.0, gapAbs=1e-9)


def solve_k(spec: ClusterSpec, k: int, solver=None) -> tuple[list[int], list[int], float]:
    """Solve the program for one k; returns (w, n) per device in ring order and the objective (ms).

    Raises:
        PlanError: the program is infeasible or the solver fails.
    """
    if solver is None:
        solver = _solver()[1]
    ring, shape = spec.ring(), spec.model
    L = shape.n_layers
    if L % k:
        raise PlanError(f"k={k} does not divide {L} layers")
    W = L // k
    head = len(ring) - 1
    # Memory in KiB: small enough numbers for the solver, while one byte over a
    # limit (1/1024 KiB) stays far above its feasibility tolerance.
    Bp = shape.layer_kv_bytes / KIB          # KiB per layer incl. KV
    O = shape.output_bytes / KIB
    C = shape.compute_bytes / KIB               # KiB per window context
    CV = max(0, shape.compute_vocab_bytes - shape.compute_bytes) / KIB  # extra of a vocabulary window
    h = shape.hidden_bytes

    prob = pulp.LpProblem(f"halda_k{k}", pulp.LpMinimize)
    w, n, u, comp, hop = [], [], [], [], []
    for i, d in enumerate(ring):
        w.append(prob.add_variable(f"w{i}", lowBound=1 if i == head else 0, upBound=W, cat="Integer"))
        if d.gpu is not None:
            cap = min(W, int(d.gpu.vram_gib * GIB // (k * shape.layer_kv_bytes)))
            nv = prob.add_variable(f"n{i}", lowBound=0, upBound=max(0, cap), cat="Integer")
            prob += nv <= w[i]
            n.append(nv)
            comp.append(d.cpu_ms_per_layer * (w[i] - nv) + d.gpu.ms_per_layer * nv)
        else:
            n.append(None)
            comp.append(d.cpu_ms_per_layer * w[i])
        if i == head:
            u.append(1)
        else:
            ui = prob.add_variable(f"u{i}", cat="Binary")
            prob += w[i] <= W * ui
            prob += w[i] >= ui
            u.append(ui)
        hop.append(d.hop_ms(h))
    prob += pulp.lpSum(w) == W

    z = prob.add_variable("z", lowBound=0, upBound=1)
    for i in range(head):
        prob += z >= u[i]
    hop_term = [u[i] * hop[i] for i in range(head)] + [z * hop[head]]

    first = []  # f_m: the first device in use (holds the first window, which takes tokens)
    for i in range(len(ring)):
        fi = prob.add_variable(f"f{i}", cat="Binary")
        prob += fi >= u[i] - pulp.lpSum(u[:i])
        first.append(fi)

    disk = []
    for i, d in enumerate(ring):
        is_head = i == head
        o = O if is_head else 0.0
        unified = d.gpu is not None and d.gpu.unified
        s = Bp * (w[i] - n[i]) + (Bp * n[i] if unified else 0) if n[i] is not None else Bp * w[i]
        if is_head:  # the last window gives logits; with k > 1 the first one is another window
            a = k * C + CV * (1 + (first[i] if k > 1 else 0))
            a_max = k * C + CV * min(k, 2)
        else:
            a = k * C * u[i] + CV * first[i]
            a_max = k * C + CV
        need = k * s + a + o
        s_max = W * Bp
        need_max = k * s_max + a_max + o
        R = d.ram_gib * GIB / KIB
        alpha = KIB / (d.disk_gbps * 1e6)    # ms to read one KiB
        res, ovf, st = (prob.add_variable(f"{m}{i}", cat="Binary") for m in ("res", "ovf", "str"))
        prob += res + ovf + st == 1
        D = prob.add_variable(f"D{i}", lowBound=0)
        disk.append(D)
        # resident: need <= R
        if need_max > R:
            prob += need <= R + (need_max - R) * (1 - res)
        # stream: two windows (and every context's buffers) fit
        two_max = 2 * s_max + a_max + o
        if two_max > R:
            prob += 2 * s + a + o <= R + (two_max - R) * (1 - st)
        # overflow: D >= alpha·reread
        if d.os == "macos":
            m_ovf = alpha * need_max
            prob += D >= alpha * need - m_ovf * (1 - ovf)
        elif need_max > R:
            m_ovf = alpha * (need_max - R)
            prob += D >= alpha * (need - R) - m_ovf * (1 - ovf)
        # stream: D >= k·(alpha·s - slack)
        # slack: the other devices' compute and hops; when m is in use the head's
        # hop is on, so a non-head m counts it as a constant (the head counts z·hop).
        slack = pulp.lpSum(comp[j] for j in range(len(ring)) if j != i) + pulp.lpSum(
            hop_term[j] for j in range(head) if j != i) + (0 if is_head else hop[head])
        prob += D >= k * (alpha * s - slack) - k * alpha * s_max * (1 - st)

    prob += k * pulp.lpSum(comp) + k * pulp.lpSum(hop_term) + pulp.lpSum(disk) + ring[head].cpu_ms_output
    status = prob.solve(solver)
    if pulp.LpStatus[status] != "Optimal":
        raise PlanError(f"the planner's program for k={k} is {pulp.LpStatus[status].lower()}")
    w_val = [int(round(v.value())) for v in w]
    n_val = [int(round(v.value())) if v is not None else 0 for v in n]
    return w_val, n_val, float(pulp.value(prob.objective))


def solve(spec: ClusterSpec, ks: list[int] | None = None, solver: str | None = None) -> Solution:
    """Halda: the plan that minimises the predicted ms per token over the candidate k.

    Args:
        spec: model shape and devices (see :mod:`homering.planner.model`).
        ks: the k to consider (default: every divisor of ``n_layers``).
        solver: ``"HiGHS"`` or ``"PULP_CBC_CMD"`` (default: HiGHS when installed).

    Ties between k go to the smaller k.

    Raises:
        PlanError: no candidate k divides the layers, or no program is feasible.
    """
    ks = candidate_rounds(spec.model.n_layers, ks)
    name, backend = _solver(solver)
    t0 = time.perf_counter()
    best: Prediction | None = None
    per_k: dict[int, float] = {}
    objectives: dict[int, float] = {}
    for k in ks:
        w, n, objectives[k] = solve_k(spec, k, backend)
        pred = evaluate(spec, k, w, n)
        per_k[k] = pred.ms_per_token
        if best is None or pred.ms_per_token < best.ms_per_token - 1e-9:
            best = pred
    solve_ms = (time.perf_counter() - t0) * 1000
    log.debug("halda: k=%d T=%.1f ms over %s in %.0f ms", best.k, best.ms_per_token, ks, solve_ms)
    return Solution(prediction=best, per_k=per_k, solve_ms=solve_ms, solver=name, objectives=objectives)

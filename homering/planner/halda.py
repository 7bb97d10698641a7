"""Halda: the exact optimum of the latency model, one mixed-integer program per k.

PRIMA.CPP (Li et al., arXiv 2504.08791, §3.3) names its layer-assignment
solver Halda and solves one integer program per number of rounds k. This is a
re-derivation for :mod:`homering.planner.model` (links, prefetch overlap, and
device dropping inside the program), written with PuLP and solved with HiGHS
(CBC when HiGHS is missing).

Program for a fixed k (W = L/k, times in ms; per device m):

- integers ``w_m ∈ [0, W]`` (head ``>= 1``), ``Σ w_m = W``; ``n_m ∈ [0, w_m]``,
  bounded by VRAM (``k·n_m·b' <= vram``), absent without a GPU; ``x_m`` the
  layers of a window held in RAM: ``w_m - n_m``, or ``w_m`` with unified memory;
- binary ``u_m`` (in use): ``u_m <= w_m <= W·u_m``; the head's is 1;
  ``z ∈ [0, 1]``, ``z >= u_m`` for every other m, switches the head's hop on;
- binary ``f_m`` (the first device in use, which holds the first window):
  ``f_m >= u_m - Σ_{j<m} u_j``; the buffers and head bytes ``r_m(f)`` =
  ``a_m + [head]·o`` of a device in use (``a_m`` from
  :meth:`~homering.planner.cluster.ModelShape.buffer_bytes`) enter as
  ``r_m(0)·u_m + (r_m(1) - r_m(0))·f_m``;
- binaries ``res_m + ovf_m + str_m = 1`` choose the disk mode. The memory
  condition of a mode (``k`` windows for resident, two for stream) is an
  integer capacity ``x_m <= cap_m(f_m)``, worked out exactly beforehand
  (:func:`ram_capacity`) and switched off by a big-M of at most W layers;
- ``D_m >= 0``, the disk ms per token: ``D_m >= k·visible_m`` of the chosen
  mode, linearised (``max(0, ·)`` by ``D_m >= 0``; the mode by big-M);
- minimise ``k·Σ comp_m + k·(Σ_{m≠head} u_m·hop_m + z·hop_head) + Σ D_m + cpu_ms_output(head)``.

Because every term of T is minimised, the solver picks each device's
cheapest open mode, exactly as the model prescribes. The winning (k, w, n) is
re-evaluated with :func:`~homering.planner.model.evaluate`, so what is reported
is the model itself, not the program's relaxation.

Numerics: a mode can hinge on one byte of a device's RAM (tens of GB), which
no floating-point tolerance resolves. The memory conditions are therefore
integer capacities in layers, computed with exact arithmetic, so no row mixes
byte-sized and RAM-sized coefficients. Written as rows in KiB (coefficients
from 1e-3 to 3e7 against a 1e-9 feasibility tolerance) they let HiGHS'
presolve cut off the optimum and report a worse plan as optimal
(tests/test_planner.py pins two such clusters; HiGHS warns about this
scaling, see ERGO-Code/HiGHS#1578 and #2033).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import pulp

from homering.planner.model import (
    GIB,
    STREAMED_LAYERS,
    ClusterSpec,
    Device,
    PlanError,
    Prediction,
    candidate_rounds,
    evaluate,
)

log = logging.getLogger(__name__)

Lp = Any
"""A PuLP variable or affine expression (PuLP has no type hints)."""


@dataclass(frozen=True)
class Solution:
    """The best plan over the candidate k, with per-k optima and the solve time (ms)."""

    prediction: Prediction
    per_k: dict[int, float]  # k -> optimal T, ms per token
    solve_ms: float
    solver: str
    objectives: dict[int, float]  # k -> the program's optimal objective (equals per_k up to tolerances)


def _solver(name: str | None = None) -> tuple[str, Any]:
    """The solver's name and a PuLP solver object (HiGHS by default, else CBC).

    Raises:
        PlanError: the named solver is not installed.
    """
    available = pulp.listSolvers(onlyAvailable=True)
    name = name or ("HiGHS" if "HiGHS" in available else "PULP_CBC_CMD")
    if name not in available:
        raise PlanError(f"MIP solver {name} is not available (have: {', '.join(available) or 'none'})")
    if name == "HiGHS":
        return name, pulp.HiGHS(
            msg=False,
            gapRel=0.0,
            gapAbs=1e-9,
            threads=1,
            mip_feasibility_tolerance=1e-9,
            primal_feasibility_tolerance=1e-9,
        )
    return name, pulp.getSolver(name, msg=False, gapRel=0.0, gapAbs=1e-9)


def ram_capacity(ram: float, copies: int, layer_bytes: int, rest: int, most: int) -> int:
    """The most layers ``x`` in ``[0, most]`` with ``copies·x·layer_bytes + rest <= ram``; -1 when none fit.

    Bytes throughout; exact (rational arithmetic), so it agrees to the byte
    with the comparisons :func:`~homering.planner.model.evaluate` makes.
    """
    room = Fraction(ram) - rest
    if room < 0:
        return -1
    return min(most, math.floor(room / (copies * layer_bytes)))


@dataclass(frozen=True)
class _Slot:
    """One device's variables in the program of one k."""

    index: int
    device: Device
    head: bool
    w: Lp  # layers per round
    n: Lp | None  # GPU layers per round (None without a GPU)
    u: Lp  # in use (the constant 1 for the head)
    x: Lp  # layers of one window held in RAM
    comp: Lp  # compute ms per round


class _Program:
    """The mixed-integer program of one k (see the module docstring)."""

    def __init__(self, spec: ClusterSpec, k: int):
        self.ring, self.shape, self.k = spec.ring(), spec.model, k
        if self.shape.n_layers % k:
            raise PlanError(f"k={k} does not divide {self.shape.n_layers} layers")
        self.W = self.shape.n_layers // k
        self.prob = pulp.LpProblem(f"halda_k{k}", pulp.LpMinimize)
        self.slots = [self._slot(i, d) for i, d in enumerate(self.ring)]
        self.prob += pulp.lpSum(s.w for s in self.slots) == self.W
        self.hops = [d.hop_ms(self.shape.hidden_bytes) for d in self.ring]
        self.z = self.prob.add_variable("z", lowBound=0, upBound=1)
        for s in self.slots[:-1]:
            self.prob += self.z >= s.u
        self.first = [self._first(s) for s in self.slots]
        disk = [self._disk(s) for s in self.slots]
        self.prob += (
            k * pulp.lpSum(s.comp for s in self.slots)
            + k * pulp.lpSum(self._hop_terms())
            + pulp.lpSum(disk)
            + self.ring[-1].cpu_ms_output
        )

    def _slot(self, i: int, d: Device) -> _Slot:
        """The layer, GPU and in-use variables of device ``i``."""
        head, W, k = i == len(self.ring) - 1, self.W, self.k
        w = self.prob.add_variable(f"w{i}", lowBound=1 if head else 0, upBound=W, cat="Integer")
        n: Lp | None = None
        x, comp = w, d.cpu_ms_per_layer * w
        if d.gpu is not None:
            cap = min(W, int(d.gpu.vram_gib * GIB // (k * self.shape.layer_kv_bytes)))
            n = self.prob.add_variable(f"n{i}", lowBound=0, upBound=max(0, cap), cat="Integer")
            self.prob += n <= w
            x = w if d.gpu.unified else w - n
            comp = d.cpu_ms_per_layer * (w - n) + d.gpu.ms_per_layer * n
        u: Lp = 1
        if not head:
            u = self.prob.add_variable(f"u{i}", cat="Binary")
            self.prob += w <= W * u
            self.prob += w >= u
        return _Slot(i, d, head, w, n, u, x, comp)

    def _first(self, s: _Slot) -> Lp:
        """f: 1 for the first device in use (it holds the first window, which takes tokens)."""
        f = self.prob.add_variable(f"f{s.index}", cat="Binary")
        self.prob += f >= s.u - pulp.lpSum(t.u for t in self.slots[: s.index])
        return f

    def _hop_terms(self) -> list[Lp]:
        """Hop ms per round of each device: ``u_m·hop_m``, and ``z·hop`` for the head."""
        return [s.u * hop for s, hop in zip(self.slots[:-1], self.hops)] + [self.z * self.hops[-1]]

    def _rest(self, head: bool, first: bool) -> int:
        """Bytes besides the layers of a device in use: its buffers, and the output block on the head."""
        k, shape = self.k, self.shape
        return shape.buffer_bytes(k, shape.vocab_windows(k, first, head)) + (shape.output_bytes if head else 0)

    def _fits(self, s: _Slot, mode: Lp, copies: int) -> None:
        """``mode`` may be 1 only if ``copies`` windows of ``s``'s RAM layers and its other bytes fit its RAM."""
        bp, W = self.shape.layer_kv_bytes, self.W
        cap0, cap1 = (ram_capacity(s.device.ram_bytes, copies, bp, self._rest(s.head, f), W) for f in (False, True))
        if min(cap0, cap1) >= W:
            return
        self.prob += s.x <= cap0 + (cap1 - cap0) * self.first[s.index] + (W - min(cap0, cap1)) * (1 - mode)

    def _slack(self, s: _Slot) -> Lp:
        """The other devices' compute and hops per round, which a prefetch overlaps (ms).

        While a device other than the head is in use the head's hop is on, so it
        counts as a constant there."""
        others = [t for t in self.slots if t.index != s.index]
        hops = [t.u * self.hops[t.index] for t in others if not t.head]
        return pulp.lpSum(t.comp for t in others) + pulp.lpSum(hops) + (0 if s.head else self.hops[-1])

    def _disk(self, s: _Slot) -> Lp:
        """D: the disk ms per token of ``s`` in the mode the program picks for it."""
        d, k, W, bp, i = s.device, self.k, self.W, self.shape.layer_kv_bytes, s.index
        ms_per_byte = d.disk_ms(1) * self.shape.read_share  # a MoE token reads only its experts' share
        rest0, rest1 = self._rest(s.head, False), self._rest(s.head, True)
        need = k * bp * s.x + rest0 * s.u + (rest1 - rest0) * self.first[i]
        need_max = k * bp * W + max(rest0, rest1)
        res, ovf, st = (self.prob.add_variable(f"{m}{i}", cat="Binary") for m in ("res", "ovf", "str"))
        self.prob += res + ovf + st == 1
        D = self.prob.add_variable(f"D{i}", lowBound=0)
        self._fits(s, res, k)
        self._fits(s, st, 2)
        ram = d.ram_bytes
        if d.os == "macos":  # overflow re-reads the whole mapping
            self.prob += D >= ms_per_byte * need - ms_per_byte * need_max * (1 - ovf)
        elif need_max > ram and self.shape.active_layer_bytes is not None:  # a MoE: the hot bytes beyond the RAM
            fault = d.fault_ms(1)  # page faults on scattered experts
            u, fresh = self.shape.shares_of()  # Halda knows how many layers a device holds, not which
            rate = fault * self.shape.read_share / u
            novel = fresh * fault * k * self.shape.layer_bytes * s.x  # a token's new experts, none cached
            over = need - (1 - u) * k * self.shape.layer_bytes * s.x - ram
            big = rate * (need_max - ram) + fresh * fault * k * self.shape.layer_bytes * W
            self.prob += D >= novel - big * (1 - ovf)
            self.prob += D >= novel + rate * over - big * (1 - ovf)
        elif need_max > ram:  # a dense model: what exceeds the RAM, and the streamed layers in flight
            f = STREAMED_LAYERS * self.shape.layer_bytes
            over = need - ram + f * s.u
            self.prob += D >= ms_per_byte * over - ms_per_byte * (need_max - ram + f) * (1 - ovf)
        stream_max = k * ms_per_byte * bp * W
        self.prob += D >= k * (ms_per_byte * bp * s.x - self._slack(s)) - stream_max * (1 - st)
        return D

    def solve(self, solver: Any) -> tuple[list[int], list[int], float]:
        """(w, n) per device in ring order and the optimal objective (ms).

        Raises:
            PlanError: the program is infeasible or the solver fails.
        """
        status = self.prob.solve(solver)
        if pulp.LpStatus[status] != "Optimal":
            raise PlanError(f"the planner's program for k={self.k} is {pulp.LpStatus[status].lower()}")
        w = [int(round(s.w.value())) for s in self.slots]
        n = [int(round(s.n.value())) if s.n is not None else 0 for s in self.slots]
        return w, n, float(pulp.value(self.prob.objective))


def solve_k(spec: ClusterSpec, k: int, solver: Any = None) -> tuple[list[int], list[int], float]:
    """Solve the program for one k; returns (w, n) per device in ring order and the objective (ms).

    Raises:
        PlanError: k does not divide the layers, the program is infeasible or the solver fails.
    """
    return _Program(spec, k).solve(solver if solver is not None else _solver()[1])


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
    if best is None:  # candidate_rounds returns at least one k
        raise PlanError("no candidate k")
    solve_ms = (time.perf_counter() - t0) * 1000
    log.debug("halda: k=%d T=%.1f ms over %s in %.0f ms", best.k, best.ms_per_token, ks, solve_ms)
    return Solution(prediction=best, per_k=per_k, solve_ms=solve_ms, solver=name, objectives=objectives)

"""The controller's state machine: its :class:`~homering.wire.ControllerState`, the plan in force, and every
transition between them in one place.

::

    WAITING ──plan──> PLANNING ──loaded──> READY ──lost / broken / join──> PLANNING …
       ^  ^              │  │                                                  │
       │  └──failed──────┘  └──no agent left / failed──> WAITING <─────────────┘
       └── ERROR (agents did not join, no feasible plan)

``READY`` is the only state that serves requests (:attr:`Planning.ready`); entering it opens
the admission gate for a new ready generation, leaving it closes the gate
(:class:`~homering.controller.admission.Admission`). Queries never change anything: the
re-planning loop (:mod:`homering.controller.replanning`) reads them and calls the transitions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from homering.controller.admission import Admission
from homering.controller.membership import Identity
from homering.wire import ControllerState, Plan


@dataclass(frozen=True)
class PlanSettings:
    """What every plan is made with (the controller's options; see :class:`~homering.controller.Controller`)."""

    model_path: Path
    n_agents: int
    n_ctx: int
    n_batch: int
    n_parallel: int
    planner: str
    rounds: int | None
    join_timeout: float
    draft_bytes: int = 0
    """Bytes of the head's draft model (``--draft MODEL``; 0: none); it picks the head (see
    :func:`~homering.controller.plans.head_of`)."""

    def made(self, plan: Plan, fingerprint: str | None) -> bool:
        """``plan`` was made for this model with these settings (a restarted controller may adopt it)."""
        return (
            plan.model_fingerprint == fingerprint
            and plan.model_path == str(self.model_path)
            and plan.n_ctx == self.n_ctx
            and plan.n_batch == self.n_batch
            and plan.n_parallel == self.n_parallel
            and plan.planner == self.planner
            and (self.rounds is None or plan.k == self.rounds)
        )


S = ControllerState
TRANSITIONS: dict[ControllerState, frozenset[ControllerState]] = {
    S.WAITING: frozenset({S.WAITING, S.PLANNING, S.READY, S.ERROR, S.OFFLINE}),
    S.PLANNING: frozenset({S.PLANNING, S.READY, S.WAITING, S.ERROR, S.OFFLINE}),
    S.READY: frozenset({S.PLANNING, S.OFFLINE}),
    S.ERROR: frozenset({S.ERROR, S.WAITING, S.PLANNING}),
    S.OFFLINE: frozenset(),
}
"""The state each state may go to (a transition elsewhere is a bug: :class:`IllegalTransition`)."""


class IllegalTransition(RuntimeError):
    """A transition the state machine does not have (a bug in the caller)."""


class Planning:
    """The controller's state, its detail, and the plan in force.

    Attributes:
        state: the :class:`~homering.wire.ControllerState` (published in the controller's status).
        detail: what the state waits for, or why it failed.
        plan: the plan in force (being loaded while ``PLANNING``), or None before the first.
        planned: identities of the members the plan in force was made for (None before the first
            plan: the first plan takes every agent at once).
        links: agent -> (one-way ms, Mbit/s) to the head, measured when the plan was made.
        broken: why the plan in force must be re-planned at once (a head reported its ring broken).
        failed: (monotonic time, why) the last re-plan failed, until a plan is ready again.

    Args:
        admission: the gate this machine opens on ``READY`` and closes on leaving it.
        on_change: called after every transition (wakes whoever waits for the state).
        clock: monotonic seconds, for ``failed``.
    """

    def __init__(
        self,
        admission: Admission,
        on_change: Callable[[], None] = lambda: None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.admission = admission
        self.on_change = on_change
        self.clock = clock
        self.state = ControllerState.WAITING
        self.detail: str | None = None
        self.plan: Plan | None = None
        self.planned: frozenset[Identity] | None = None
        self.links: dict[str, tuple[float, float]] = {}
        self.broken: str | None = None
        self.failed: tuple[float, str] | None = None

    @property
    def ready(self) -> bool:
        """A loaded plan is intact and serves requests (False while re-planning or after a loss)."""
        return self.state == ControllerState.READY

    # ------------------------------------------------------------------ transitions
    def _enter(self, state: ControllerState, detail: str | None) -> None:
        if state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"the controller cannot go from {self.state} to {state}")
        self.state, self.detail = state, detail
        if state == ControllerState.READY:
            self.admission.plan_ready()
        else:
            self.admission.plan_gone()
        self.on_change()

    def begin(self, detail: str | None = None) -> None:
        """Re-planning starts (or goes on, with a new ``detail``): no plan serves requests meanwhile."""
        self._enter(ControllerState.PLANNING, detail)

    def interrupt(self) -> None:
        """The plan in force lost an agent or its ring broke: stop serving it, re-plan at once."""
        self.broken = None
        self._enter(ControllerState.PLANNING, None)

    def loading(
        self, plan: Plan, planned: frozenset[Identity], links: dict[str, tuple[float, float]], detail: str
    ) -> None:
        """``plan`` (for the members ``planned``) is published and its agents load it."""
        self.plan, self.planned, self.links = plan, planned, links
        self._enter(ControllerState.PLANNING, detail)

    def serve(self) -> None:
        """The plan in force is loaded by every agent of its ring: serve requests (a new ready generation)."""
        self.failed = None
        self._enter(ControllerState.READY, None)

    def adopt(self, plan: Plan, planned: frozenset[Identity], links: dict[str, tuple[float, float]]) -> None:
        """Take over a plan that its agents already serve (a restarted controller), and serve it."""
        self.plan, self.planned, self.links = plan, planned, links
        self.serve()

    def restart(self) -> None:
        """Plan again from scratch, as the first plan (every agent still there), e.g. after a loss at start."""
        self.planned = None

    def no_agents(self) -> None:
        """Every agent left: wait for one to join (requests waiting to resume end with an error)."""
        self.planned = frozenset()
        self.failed = (self.clock(), "every agent left")
        self._enter(ControllerState.WAITING, "no agents")

    def replan_failed(self, why: str, members: frozenset[Identity]) -> None:
        """A re-plan failed (e.g. the model no longer fits the agents left): wait until the members change."""
        self.failed = (self.clock(), why)
        self.planned = members
        self._enter(ControllerState.WAITING, f"re-planning failed: {why}")

    def fail(self, detail: str) -> None:
        """The cluster cannot serve (agents did not join, no feasible plan): ``ERROR`` with why."""
        self._enter(ControllerState.ERROR, detail)

    def ring_broken(self, plan_id: str, why: str) -> None:
        """A head reported that the ring of plan ``plan_id`` broke: re-plan now, if that plan still serves."""
        if self.ready and self.plan is not None and self.plan.plan_id == plan_id:
            self.broken = why
            self.on_change()

    def leave(self) -> bool:
        """The controller stops: ``OFFLINE``, unless it failed (an error's detail stays for clients).
        True when the state changed (then publish it)."""
        if self.state in (ControllerState.ERROR, ControllerState.OFFLINE):
            return False
        self._enter(ControllerState.OFFLINE, None)
        return True

"""Bringing the cluster up and keeping a plan in force: where a lost agent leads to a re-plan.

:class:`Replanner` drives the state machine (:class:`~homering.controller.planning.Planning`): it
waits for the agents, then has the first plan adopted or made and loaded
(:class:`~homering.controller.loading.PlanLoader`). Then it watches the members
(:class:`~homering.controller.membership.Membership`) and re-plans: at once when an agent of the
ring is lost or a head reports its ring broken (the requests in flight resume on the new ring), at
the next request boundary when agents join.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable

from homering.controller.changes import Changes
from homering.controller.links import AgentLost
from homering.controller.loading import PlanLoader
from homering.controller.membership import Membership
from homering.controller.planning import Planning, PlanSettings
from homering.controller.serving import RequestService
from homering.errors import HomeringError
from homering.models.gguf_info import ModelInfo

SETTLE_S = 0.5  # wait for a burst of joins/leaves to settle before re-planning

log = logging.getLogger("homering.controller")


class Change(enum.Enum):
    """Why the plan in force must be replaced."""

    LOST = "lost"  # an agent of its ring is no longer a live member: re-plan at once
    BROKEN = "broken"  # a head reported its ring broken: re-plan at once
    JOINED = "joined"  # the members changed otherwise (agents joined): re-plan at a request boundary


class Replanner:
    """Brings the cluster up and keeps a plan in force.

    Args:
        settings: what plans are made with.
        loader: makes and loads (or adopts) one plan.
        planning: the state machine it drives.
        membership: the agents.
        requests: the requests in flight (interrupted on a re-plan; a join waits for their boundary).
        changes: wakes its waits.
        publish_status: ``await publish_status()`` publishes the state after a transition.
    """

    def __init__(
        self,
        settings: PlanSettings,
        loader: PlanLoader,
        planning: Planning,
        membership: Membership,
        requests: RequestService,
        changes: Changes,
        publish_status: Callable[[], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.loader = loader
        self.planning = planning
        self.membership = membership
        self.requests = requests
        self.changes = changes
        self.publish_status = publish_status

    # ------------------------------------------------------------------ bring-up
    async def bring_up(self, info: ModelInfo) -> None:
        """Wait for the agents, then adopt the retained plan or make one, and wait until it is loaded.

        Raises:
            HomeringError: the agents did not join, no feasible plan, or they could not load it.
        """
        s, m = self.settings, self.membership
        log.info("waiting for %d agent(s) on %s", s.n_agents, self.loader.bus.broker)
        if not await self.changes.wait_for(lambda: len(m.profiled_agents()) >= s.n_agents, s.join_timeout):
            live, done, errors = m.live_agents(), m.profiled_agents(), m.failures()
            msg = (
                f"only {len(done)} of {s.n_agents} agents joined and profiled within "
                f"{s.join_timeout:.0f} s ({len(live)} connected)"
                + (
                    f"; {'; '.join(errors)}"
                    if errors
                    else f": start more with 'homering agent --broker {self.loader.bus.broker}'"
                )
            )
            self.planning.fail(msg)
            await self.publish_status()
            raise HomeringError(msg)
        if await self.loader.adopt():
            return
        while True:
            try:
                await self.loader.replan(info)
                return
            except AgentLost as exc:
                log.warning("%s: planning again", exc)
                self.planning.restart()  # the first plan: every agent still there

    # ------------------------------------------------------------------ keeping it in force
    def change(self) -> Change | None:
        """Why the plan in force must be replaced now, or None (changes nothing)."""
        plan, planned = self.planning.plan, self.planning.planned
        if plan is None:
            return None
        if self.membership.lost(planned, {a.name for a in plan.ring}):
            return Change.LOST
        if self.planning.broken:
            return Change.BROKEN
        if self.membership.members(planned) != planned:
            return Change.JOINED
        return None

    def _at_boundary(self) -> bool:
        return self.requests.runs.at_boundary(self.planning.admission.generation)

    def _actionable(self) -> bool:
        """There is something to do: re-plan now, or start or stop draining the plan for a join."""
        change, draining = self.change(), self.planning.admission.draining
        return (change is Change.JOINED) != draining or (
            change is not None and (change is not Change.JOINED or self._at_boundary())
        )

    async def maintain(self, info: ModelInfo) -> None:
        """Re-plan when the agents change, until cancelled: at once when one of the ring is lost (the
        requests in flight resume on the new ring), at the next request boundary when agents join."""
        while True:
            await self.changes.wait_for(self._actionable, None, poll=0.5)
            change = self.change()
            self.planning.admission.drain(change is Change.JOINED)  # new requests wait for the join's plan
            if change is None or (change is Change.JOINED and not self._at_boundary()):
                continue
            if change is Change.JOINED:
                await asyncio.sleep(SETTLE_S)  # let a burst of joins settle
                if self.change() is not Change.JOINED or not self._at_boundary():
                    continue  # (a loss meanwhile is handled at once, above)
                log.info("agents changed: re-planning")
            self._note(change)
            self.planning.interrupt()
            await self.requests.interrupt_all()
            if not self.membership.profiled_agents():
                self.planning.no_agents()
                log.warning("every agent left; waiting for one to join")
                await self.publish_status()
                await self.changes.wait_for(
                    lambda: bool(self.membership.members(self.planning.planned)), None, poll=0.5
                )
                continue
            await self._replan_or_keep(info)

    def _note(self, change: Change) -> None:
        """Log why the plan is replaced; a lost agent's loss counts against it (join hysteresis)."""
        if change is Change.LOST:
            plan = self.planning.plan
            lost = self.membership.lost(self.planning.planned, {a.name for a in plan.ring} if plan else set())
            log.warning("lost agent(s) %s: re-planning over the rest", ", ".join(lost))
            for name in lost:
                self.membership.record_loss(name)
        elif change is Change.BROKEN:
            log.warning("a head reported a broken ring (%s): re-planning", self.planning.broken)

    async def _replan_or_keep(self, info: ModelInfo) -> None:
        """Re-plan; when that loses an agent but the plan in force is intact, serve it again; when it
        fails, wait for the members to change."""
        try:
            await self.loader.replan(info)
        except AgentLost as exc:
            if self.still_served():  # e.g. a joining agent left while links were probed
                log.warning("%s; the plan in force still runs", exc)
                self.planning.serve()
                await self.publish_status()
            else:
                log.warning("%s: planning again", exc)  # lost() now names it: the loop comes straight back
        except HomeringError as exc:  # e.g. the model no longer fits the agents left
            log.error("re-planning failed: %s", exc)
            self.planning.replan_failed(str(exc), self.membership.members(self.planning.planned))
            await self.publish_status()

    def still_served(self) -> bool:
        """The plan in force lost none of its agents, and every agent of its ring is ``ready`` with it."""
        plan = self.planning.plan
        return plan is not None and self.membership.serves(plan, self.planning.planned)

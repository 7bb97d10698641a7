"""Making one plan and seeing it loaded, or adopting the plan the agents already serve.

:class:`PlanLoader` probes the members' links to the head-to-be, plans over them
(:func:`~homering.controller.plans.make_plan`), slices the plan's windows, names the plan in the
controller's status (agents load only the plan the controller vouches for), publishes it, and waits
until every agent of its ring is ``ready`` with it. A restarted controller adopts the retained plan
instead when its agents still serve it: then nobody reloads anything.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

from homering.controller.changes import Changes
from homering.controller.links import AgentLost, LinkProber
from homering.controller.membership import Membership, identity
from homering.controller.planning import Planning, PlanSettings
from homering.controller.plans import make_plan
from homering.controller.windows import WindowStore
from homering.errors import HomeringError
from homering.models.gguf_info import ModelInfo
from homering.planner.cluster import with_read_share
from homering.planner.model import ModelShape, PlanError, shape_from_gguf
from homering.profiler.device import model_layer_routing
from homering.profiler.experts import LayerRouting
from homering.transport.bus import Bus
from homering.wire import AgentProfile, AgentState, Plan, Topics

log = logging.getLogger("homering.controller")


class PlanLoader:
    """Makes plans and sees them loaded (driving the state machine through ``PLANNING`` to ``READY``).

    Args:
        settings: what plans are made with.
        bus: publishes the plan.
        planning: the state machine.
        membership: the agents.
        windows: slices each plan's windows.
        probes: measures the agents' links before a plan.
        changes: wakes its waits.
        publish_status: ``await publish_status()`` publishes the state after a transition.
    """

    def __init__(
        self,
        settings: PlanSettings,
        bus: Bus,
        planning: Planning,
        membership: Membership,
        windows: WindowStore,
        probes: LinkProber,
        changes: Changes,
        publish_status: Callable[[], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.planning = planning
        self.membership = membership
        self.windows = windows
        self.probes = probes
        self.changes = changes
        self.publish_status = publish_status
        self.retained: Plan | None = None
        """The plan the broker retains (a previous controller's, or ours)."""

    def on_retained_plan(self, plan: Plan) -> None:
        """The plan the broker retains arrived (on subscribing, and whenever one is published)."""
        self.retained = plan

    async def adopt(self) -> bool:
        """Take over the retained plan when its agents still serve it (a restarted controller).

        The plan must be for this model with these settings, and every agent of its ring must be
        live and ``ready`` with it; then no agent reloads anything.
        """
        statuses = self.membership.statuses
        serving = {s.plan_id for s in statuses.values() if s.state == AgentState.READY and s.plan_id}
        if not serving:
            return False
        await self.changes.wait_for(lambda: self.retained is not None and self.retained.plan_id in serving, 2.0)
        plan = self.retained
        if plan is None or plan.plan_id not in serving:
            return False
        live = {p.name: p for p in self.membership.profiled_agents()}
        members_ok = all(
            a.name in live
            and (live[a.name].host, live[a.name].data_port) == (a.host, a.data_port)
            and statuses[a.name].ready_on(plan.plan_id)
            for a in plan.ring
        )
        if not (self.settings.made(plan, self.windows.fingerprint) and members_ok):
            return False
        hashed = plan.model_copy(deep=True)
        await self.windows.prepare(hashed)
        if hashed != plan:  # hashes missing (an older controller's plan) or different: the agents reload
            return False
        self.planning.adopt(
            plan,
            frozenset(identity(p) for p in live.values()),
            {a.name: (a.link_ms, 0.0) for a in plan.ring if a.link_ms is not None},
        )
        await self.publish_status()
        log.info(
            "adopted plan %s: its %d agent(s) still serve it (head %s)", plan.plan_id, len(plan.ring), plan.head.name
        )
        return True

    async def replan(self, info: ModelInfo) -> None:
        """Probe links, plan over the members, publish the plan, and wait until it is loaded.

        Raises:
            AgentLost: an agent of the plan was lost while it was made or loaded.
            HomeringError: no agents, no feasible plan, or the agents could not load it.
        """
        m, planning = self.membership, self.planning
        planning.begin()
        await self.publish_status()
        members = m.members(planning.planned)
        s = self.settings
        shape = shape_from_gguf(s.model_path, s.n_ctx, s.n_parallel, s.n_batch)
        agents = await self.probes.measure(
            [p for p in m.profiled_agents() if identity(p) in members], s.draft_bytes, shape.head_bytes
        )
        if not agents:
            raise HomeringError("no agents left to plan for")
        plan = await self._make(agents, info, shape)
        await self.windows.prepare(plan)
        probed = {p.name for p in agents}
        for name in {x[0] for x in members} - probed:  # the link probe failed: it rejoins after a hold
            m.hold_back(name)
        links = {a.name: (a.device.link_ms, a.device.link_mbps) for a in agents if a.device}
        # names the new plan: agents load only the plan the controller vouches for
        planning.loading(plan, frozenset(x for x in members if x[0] in probed), links, self.loading_detail(plan))
        await self.publish_status()
        log.info(
            "plan %s (%s, k=%d, predicted %.1f ms/token): %s%s",
            plan.plan_id,
            plan.planner,
            plan.k,
            plan.predicted_ms_per_token or 0,
            ", ".join(f"{a.name}{[(w.start, w.end) for w in a.windows]}" for a in plan.ring),
            f"; dropped {', '.join(plan.dropped)}" if plan.dropped else "",
        )
        await self.bus.publish(Topics.PLAN, plan, retain=True)
        await self._wait_loaded(plan)
        planning.serve()
        await self.publish_status()
        log.info("cluster ready: %d agent(s), head %s", len(plan.ring), plan.head.name)

    async def _make(self, agents: list[AgentProfile], info: ModelInfo, base: ModelShape) -> Plan:
        """The planner's plan over ``agents`` for the model of shape ``base`` (its read shares come from the agents'
        profiles and the model's routing); an infeasible plan puts the controller in ``ERROR``."""
        s = self.settings
        shares = [
            (a.device.read_share, a.device.hot_share or 1.0, a.device.novel_share or 0.0)
            if a.device and a.device.read_share
            else None
            for a in agents
        ]
        routing = await asyncio.to_thread(self._layer_routing, info)
        layers = (routing.hot_share, routing.novel_share) if routing else None
        shape = with_read_share(base, shares, layers)
        try:
            return make_plan(
                agents,
                shape,
                model_path=str(s.model_path),
                model_fingerprint=info.fingerprint,
                n_ctx=s.n_ctx,
                n_batch=s.n_batch,
                n_parallel=s.n_parallel,
                planner=s.planner,
                ks=[s.rounds] if s.rounds else None,
                draft_bytes=s.draft_bytes,
            )
        except PlanError as exc:
            self.planning.fail(str(exc))
            await self.publish_status()
            raise

    @staticmethod
    def _layer_routing(info: ModelInfo) -> LayerRouting | None:
        """A MoE's per-layer routing, measured on the controller's copy of the model once (cached); None for a
        dense model, or when it cannot be measured (the plan then takes the agents' probe figures)."""
        try:
            return model_layer_routing(info, threads=max(1, min(4, os.cpu_count() or 1)))
        except HomeringError as exc:
            log.warning("cannot measure how %s routes its tokens: %s", info.path.name, exc)
            return None

    async def _wait_loaded(self, plan: Plan) -> None:
        """Wait until every agent of ``plan``'s ring is ``ready`` with it; the status detail names the others.

        Raises:
            AgentLost: an agent of the plan was lost meanwhile.
            HomeringError: an agent could not load its windows, or the agents did not in time.
        """
        limit = self.settings.join_timeout * 5
        deadline = time.monotonic() + limit
        while True:
            problem = self._load_problem(plan)
            if problem is not None:
                raise problem
            if self._loaded(plan):
                return
            shown = self.loading_detail(plan)
            if self.planning.detail != shown:  # the status names whom the plan waits for
                self.planning.begin(shown)
                await self.publish_status()

            def moved(shown: str = shown) -> bool:  # a problem, loaded, or another agent ready
                return self._load_problem(plan) is not None or self._loaded(plan) or self.loading_detail(plan) != shown

            if not await self.changes.wait_for(moved, deadline - time.monotonic(), poll=0.5):
                raise HomeringError(f"the agents did not load their windows within {limit:.0f} s ({shown})")

    def _loaded(self, plan: Plan) -> bool:
        return not self.membership.unready(plan)

    def _load_problem(self, plan: Plan) -> HomeringError | None:
        """Why ``plan`` will not load (an agent lost, or one that failed to load its windows), or None."""
        lost = self.membership.lost(self.planning.planned, {a.name for a in plan.ring})
        if lost:
            return AgentLost(f"lost agent(s) {', '.join(lost)} while the plan loaded")
        statuses = [self.membership.statuses.get(a.name) for a in plan.ring]
        failed = [s for s in statuses if s and s.state == AgentState.ERROR and s.plan_id == plan.plan_id]
        if failed:
            return HomeringError(f"an agent could not load its windows: {failed[0].detail}")
        return None

    def loading_detail(self, plan: Plan) -> str:
        """The status detail while ``plan`` loads: the agents of its ring not ``ready`` with it yet."""
        left = self.membership.unready(plan)
        return f"waiting for {', '.join(left)} to load plan {plan.plan_id}" if left else f"plan {plan.plan_id} loaded"

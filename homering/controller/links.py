"""Link probes before a plan: each agent measures its data-plane link to the head-to-be.

:class:`LinkProber` owns the probes in progress and their answers (:class:`~homering.wire.LinkReport`);
the planner then uses the measured one-way latency and bandwidth of every agent's hop.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable

from homering.controller.changes import Changes
from homering.controller.membership import Membership
from homering.controller.plans import head_of
from homering.errors import HomeringError
from homering.transport.bus import Bus
from homering.wire import AgentProfile, LinkProbe, LinkReport, Topics

PROBE_TIMEOUT_S = 15.0

log = logging.getLogger("homering.controller")


class AgentLost(HomeringError):
    """An agent of the plan being made or loaded was lost: plan again over the others."""


class LinkProber:
    """Asks agents, one at a time, to measure their link to the head-to-be (so that they do not share
    bandwidth), and collects the answers.

    Args:
        bus: publishes the probes.
        membership: whether the agents are still live while they measure.
        changes: wakes the wait for an answer.
        progress: ``await progress(detail)`` before each probe (the controller's status names whom it waits for).
    """

    def __init__(
        self, bus: Bus, membership: Membership, changes: Changes, progress: Callable[[str], Awaitable[None]]
    ) -> None:
        self.bus = bus
        self.membership = membership
        self.changes = changes
        self.progress = progress
        self._pending: set[str] = set()
        self._reports: dict[str, LinkReport] = {}

    def on_report(self, report: LinkReport) -> None:
        """An agent's answer (answers to probes nobody waits for are dropped)."""
        if report.probe_id in self._pending:
            self._reports[report.probe_id] = report

    async def measure(
        self, agents: list[AgentProfile], draft_bytes: int = 0, head_bytes: int = 0
    ) -> list[AgentProfile]:
        """The agents with ``device.link_*`` filled in by their measured link to the head (:func:`head_of`, with a
        draft model of ``draft_bytes`` and the target's ``head_bytes``); an agent whose probe fails is left out
        (it could not reach the head).

        Raises:
            AgentLost: the head-to-be was lost meanwhile.
        """
        if len(agents) < 2:
            return agents
        head = head_of(agents, draft_bytes, head_bytes)
        out = []
        for p in agents:
            if p.name == head.name:
                out.append(p)
                continue
            report = await self._probe(p, head)
            if report is None:
                continue
            log.info("link %s -> %s: %.3f ms, %.0f Mbit/s", p.name, head.name, report.link_ms, report.link_mbps)
            assert p.device is not None  # only profiled agents are planned
            device = p.device.model_copy(update={"link_ms": report.link_ms, "link_mbps": report.link_mbps})
            out.append(p.model_copy(update={"device": device}))
        return out

    async def _probe(self, p: AgentProfile, head: AgentProfile) -> LinkReport | None:
        """Agent ``p``'s answer, or None (no answer in time, or it cannot reach the head)."""
        probe_id = uuid.uuid4().hex[:12]
        live = self.membership.live
        await self.progress(f"waiting for {p.name} to measure its link to {head.name}")
        self._pending.add(probe_id)
        try:
            await self.bus.publish(
                Topics.probe(p.name), LinkProbe(probe_id=probe_id, host=head.host, port=head.data_port)
            )
            answered = await self.changes.wait_for(
                lambda: probe_id in self._reports or not live(p.name) or not live(head.name), PROBE_TIMEOUT_S, poll=0.5
            )
        finally:
            self._pending.discard(probe_id)
        report = self._reports.pop(probe_id, None)
        if not live(head.name):
            raise AgentLost(f"lost agent {head.name} (the head-to-be) while probing links")
        if not answered or report is None:
            log.warning("agent %s did not answer the link probe; left out of the plan", p.name)
            return None
        if report.error:
            log.warning("agent %s cannot reach the head: %s; left out of the plan", p.name, report.error)
            return None
        return report

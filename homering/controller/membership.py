"""Who is in the cluster: agents' profiles, statuses and heartbeats; who is live, who joins, who is lost.

:class:`Membership` owns everything the controller knows about agents as members: the retained
profile, status and stats each agent publishes, when each was last heard, when its last will
arrived, and when it was lost before. From these it answers, without changing anything:

* **live** (:meth:`Membership.live`): the status is up and the heartbeat (:class:`AgentStats`, every
  second) goes on. Silence counts only while the controller is connected and its own event loop
  was free to read (:meth:`Membership.watch_loop`); a last will counts once the controller's own
  connection outlived it by :data:`OFFLINE_GRACE_S` (a stopping broker sends every client's will).
* **members** (:meth:`Membership.members`): the identities a plan would be made for now. A new or
  returning agent must stay up :data:`JOIN_HOLD_S`, doubling with each loss in the last
  :data:`FLAP_WINDOW_S` (hysteresis: a flapping device does not force re-plans in a loop).
* **lost** (:meth:`Membership.lost`): agents of the plan's ring that are no longer live members.

The clock is injectable (``clock``, monotonic seconds) so that the rules can be checked without
waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection

from homering.wire import LIVE_AGENT_STATES, AgentProfile, AgentState, AgentStats, AgentStatus, Plan

OFFLINE_GRACE_S = 0.5  # a last will counts once our own connection outlived it (a stopping broker sends them all)
LOST_AFTER_S = 3.5  # an agent whose heartbeat (stats, every 1 s) stops this long counts as lost
LOOP_TICK_S = 0.25  # how often the controller checks that its own event loop runs
LOOP_STALL_S = 1.0  # a tick this late means the loop was blocked: heartbeats were not read, not missing
JOIN_HOLD_S = 2.0  # a joining agent must stay up this long before it is planned in (doubles per recent loss)
JOIN_HOLD_MAX_S = 60.0
FLAP_WINDOW_S = 300.0  # losses within this window count against a flapping agent

log = logging.getLogger("homering.controller")

Identity = tuple[str, str, int, int]
"""An agent process as a member: (name, host, data port, pid). A restarted agent is a new member."""


def identity(p: AgentProfile) -> Identity:
    """The member identity of the agent that published ``p``."""
    return (p.name, p.host, p.data_port, p.pid)


class Membership:
    """The agents the controller hears, and the rules that make them live, members or lost.

    Args:
        fingerprint: the model's fingerprint: only agents that profiled for it are planned.
        clock: monotonic seconds [default: ``time.monotonic``].
    """

    def __init__(self, *, fingerprint: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.fingerprint = fingerprint
        self.profiles: dict[str, AgentProfile] = {}
        self.statuses: dict[str, AgentStatus] = {}
        self.agent_stats: dict[str, AgentStats] = {}
        self._clock = clock
        self._last_seen: dict[str, float] = {}  # agent -> time of its last message
        self._live_since: dict[str, float] = {}  # agent -> when it (re)appeared live
        self._offline_at: dict[str, float] = {}  # agent -> when its "offline" status arrived
        self._losses: dict[str, list[float]] = {}  # agent -> times it was lost (hysteresis)
        self._connected = False
        self._connected_at = 0.0
        self._disconnected_at = -1.0  # when our broker connection last dropped
        self._loop_tick: float | None = None  # the last tick of watch_loop (None: not running)
        self._loop_stalled_at = 0.0  # when the loop came back from its last block

    # ------------------------------------------------------------------ events
    def connected(self) -> None:
        """Our broker connection is up (again): silence is measured from now at the earliest."""
        self._connected, self._connected_at = True, self._clock()

    def disconnected(self) -> None:
        """Our broker connection dropped: nobody is judged silent until it is back."""
        self._connected, self._disconnected_at = False, self._clock()

    def on_profile(self, profile: AgentProfile) -> None:
        """An agent's (retained) profile."""
        self.profiles[profile.name] = profile
        self.heard(profile.name)

    def on_status(self, name: str, status: AgentStatus, *, retained: bool) -> None:
        """Agent ``name``'s status; ``retained``: the broker's stored copy (it predates us)."""
        before = self.statuses.get(name)
        self.statuses[name] = status
        if status.state == AgentState.OFFLINE:
            if retained:
                self._offline_at.pop(name, None)
            else:
                self._offline_at[name] = self._clock()
            log.warning("agent %s went offline", name)
            return
        if before is None or before.state not in LIVE_AGENT_STATES:
            self._live_since[name] = self._clock()
        self.heard(name)

    def on_stats(self, stats: AgentStats, *, retained: bool) -> None:
        """An agent's stats: its heartbeat, unless it is the broker's retained copy."""
        self.agent_stats[stats.name] = stats
        if not retained:
            self.heard(stats.name)

    def heard(self, name: str) -> None:
        """A message from agent ``name``: its heartbeat goes on (an agent heard after silence is up anew)."""
        now = self._clock()
        if name not in self._last_seen or self.silent(name):
            self._live_since[name] = now
        self._last_seen[name] = now

    def record_loss(self, name: str) -> None:
        """Agent ``name`` was lost (its hold before it is planned in again doubles)."""
        now = self._clock()
        self._losses[name] = [t for t in self._losses.get(name, []) if now - t < FLAP_WINDOW_S] + [now]

    def hold_back(self, name: str) -> None:
        """Leave agent ``name`` out until it has stayed up a (longer) hold from now (e.g. its link probe failed)."""
        self.record_loss(name)
        self._live_since[name] = self._clock()

    async def watch_loop(self) -> None:
        """Tick every :data:`LOOP_TICK_S`; a late tick means the event loop was blocked (a slow request, a
        long parse): :meth:`silent` then gives every agent its full grace again from that moment."""
        self._loop_tick = self._clock()
        try:
            while True:
                await asyncio.sleep(LOOP_TICK_S)
                now = self._clock()
                if now - self._loop_tick > LOOP_TICK_S + LOOP_STALL_S:
                    log.warning(
                        "the controller's event loop was blocked for %.1f s", now - self._loop_tick - LOOP_TICK_S
                    )
                    self._loop_stalled_at = now
                self._loop_tick = now
        finally:
            self._loop_tick = None

    # ------------------------------------------------------------------ queries (they change nothing)
    def silent(self, name: str) -> bool:
        """The agent's heartbeat stopped: nothing from it for :data:`LOST_AFTER_S` while we were connected
        and the event loop was free to hear it.

        A loop that was blocked (:meth:`watch_loop`) had the heartbeats wait unread in the socket: then
        nobody is silent until :data:`LOST_AFTER_S` after the loop came back.
        """
        now = self._clock()
        if self._loop_tick is not None and now - self._loop_tick > LOOP_STALL_S:
            return False  # blocked until just now: the reader has not caught up
        since = max(self._last_seen.get(name, 0.0), self._connected_at, self._loop_stalled_at)
        return self._connected and now - since > LOST_AFTER_S

    def live(self, name: str) -> bool:
        """The agent's status is live and its heartbeat goes on.

        An ``offline`` status (a last will) counts only once our own broker
        connection outlived it by :data:`OFFLINE_GRACE_S`: a broker that stops
        publishes every client's will, and the agents come back with it (then
        their heartbeat decides). A retained ``offline`` (the agent was gone
        before this controller subscribed) counts at once.
        """
        status = self.statuses.get(name)
        if status is None or self.silent(name):
            return False
        if status.state in LIVE_AGENT_STATES:
            return True
        if status.state != AgentState.OFFLINE:
            return False
        at = self._offline_at.get(name)
        if at is None:  # retained: it was gone before we came
            return False
        if not self._connected:  # while we are away from the broker we cannot tell
            return True
        if at <= self._disconnected_at <= at + OFFLINE_GRACE_S:  # a stopping broker's will: the heartbeat decides
            return True
        return self._clock() - at < OFFLINE_GRACE_S

    def live_agents(self) -> list[AgentProfile]:
        """Agents with a profile whose status is not offline/error and whose heartbeat goes on, by name."""
        return [p for n, p in sorted(self.profiles.items()) if self.live(n)]

    def profiled_agents(self) -> list[AgentProfile]:
        """Live agents that have measured their device for this model."""
        return [
            p for p in self.live_agents() if p.device is not None and p.device.model_fingerprint == self.fingerprint
        ]

    def hold_s(self, name: str) -> float:
        """How long a (re)joining agent must stay up before it is planned in: doubles with each recent loss."""
        now = self._clock()
        recent = [t for t in self._losses.get(name, []) if now - t < FLAP_WINDOW_S]
        return min(JOIN_HOLD_S * 2 ** len(recent), JOIN_HOLD_MAX_S)

    def members(self, planned: frozenset[Identity] | None) -> frozenset[Identity]:
        """Identities of the agents a plan would be made for now.

        ``planned``: the members the plan in force was made for (None before the first plan, which
        takes every profiled agent at once). Those stay members while they live; a new or returning
        agent becomes one after :meth:`hold_s` seconds up.
        """
        if planned is None:
            return frozenset(identity(p) for p in self.profiled_agents())
        now, out = self._clock(), set()
        for p in self.profiled_agents():
            ident = identity(p)
            if ident in planned or now - self._live_since.get(p.name, now) >= self.hold_s(p.name):
                out.add(ident)
        return frozenset(out)

    def lost(self, planned: frozenset[Identity] | None, ring: Collection[str]) -> list[str]:
        """Agents of ``ring`` (the plan in force's names) planned as members and no longer live members."""
        if planned is None:
            return []
        current = {m[0] for m in self.members(planned)}
        return sorted(m[0] for m in planned if m[0] in ring and m[0] not in current)

    def unready(self, plan: Plan) -> list[str]:
        """Agents of ``plan``'s ring (in ring order) that are not ``ready`` with it."""
        return [
            a.name
            for a in plan.ring
            if not ((st := self.statuses.get(a.name)) is not None and st.ready_on(plan.plan_id))
        ]

    def serves(self, plan: Plan, planned: frozenset[Identity] | None) -> bool:
        """``plan`` (made for the members ``planned``) lost none of its agents, and every agent of its ring is
        ``ready`` with it."""
        return not self.lost(planned, {a.name for a in plan.ring}) and not self.unready(plan)

    def failures(self) -> list[str]:
        """``name: detail`` of every agent whose status is ``error``, by name."""
        return [
            f"{n}: {s.detail}" for n, s in sorted(self.statuses.items()) if s.state == AgentState.ERROR and s.detail
        ]

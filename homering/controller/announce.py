"""What the controller publishes about itself: its status (retained, with a last will) and its stats.

The status (:class:`~homering.wire.ControllerStatus`) carries the state machine's state and detail,
the plan in force's id (agents load only the plan the controller vouches for), the model and, with an
API, its URL (agents without the model download windows from it). It is published after every
transition, again after every reconnect, and ``offline`` on a clean exit; the broker publishes the
will's ``offline`` when the controller vanishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiomqtt

from homering.controller.planning import Planning, PlanSettings
from homering.controller.windows import WindowStore
from homering.transport import windows as dist
from homering.transport.bus import Bus
from homering.wire import ControllerState, ControllerStats, ControllerStatus, Topics

STATS_INTERVAL_S = 2.0


class Announcer:
    """Publishes the controller's status and stats.

    Args:
        bus: where to.
        planning: the state, its detail and the plan in force.
        windows: the model's facts (once read).
        settings: the model file and the context of one sequence.
        api_url: the API's base URL (None: no API).
        stats: the controller's :class:`ControllerStats` now.
    """

    def __init__(
        self,
        bus: Bus,
        planning: Planning,
        windows: WindowStore,
        settings: PlanSettings,
        *,
        api_url: str | None,
        stats: Callable[[], ControllerStats],
    ) -> None:
        self.bus = bus
        self.planning = planning
        self.windows = windows
        self.model_path = settings.model_path
        self.n_ctx = settings.n_ctx
        self.api_url = api_url
        self.stats = stats

    def status(self) -> ControllerStatus:
        """The controller's status message now."""
        plan, info = self.planning.plan, self.windows.info
        return ControllerStatus(
            state=self.planning.state,
            model=self.model_path.name,
            model_path=str(self.model_path),
            model_fingerprint=self.windows.fingerprint,
            n_ctx=self.n_ctx,
            plan_id=plan.plan_id if plan else None,
            detail=self.planning.detail,
            api=self.api_url,
            model_facts=dist.model_facts(info) if info else None,
        )

    def will(self) -> aiomqtt.Will:
        """The last will of a connection (signed when it is made): ``offline``, retained."""
        offline = self.bus.codec.encode(ControllerStatus(state=ControllerState.OFFLINE))
        return aiomqtt.Will(Topics.CONTROLLER, offline, qos=1, retain=True)

    async def publish_status(self, *, wait: bool = True) -> None:
        """Publish (retained) the status; ``wait``: for the broker while it is away."""
        await self.bus.publish(Topics.CONTROLLER, self.status(), retain=True, wait=wait)

    async def progress(self, detail: str) -> None:
        """Re-planning goes on; say what it waits for now."""
        self.planning.begin(detail)
        await self.publish_status()

    async def leave(self) -> None:
        """A clean exit sends no will: say ``offline`` ourselves (unless failed: an error's detail stays)."""
        if self.planning.leave():
            await self.publish_status(wait=False)

    async def publish_stats(self) -> None:
        """Publish :class:`ControllerStats` (retained) every :data:`STATS_INTERVAL_S`, until cancelled."""
        while True:
            await self.bus.publish(Topics.CONTROLLER_STATS, self.stats(), qos=0, retain=True, wait=False)
            await asyncio.sleep(STATS_INTERVAL_S)

"""``homering agent``: one device of the ring, and the supervisor of its parts.

An agent publishes its profile and status over MQTT, waits for a plan, slices and loads its layer windows,
and serves its part of the ring on a TCP data port: frames from its predecessor go through its window and
on to its successor. The head (the ring's last agent) also runs the generation loops: it sends token ids
to the ring's first agent, gets logits back through its own last window, samples, and streams tokens to the
client over MQTT.

:class:`Agent` connects and routes messages; each part owns its state:

- :mod:`~homering.agent.loading`: applying a plan (window files, LayerWindows, the link to the successor);
- :mod:`~homering.agent.ring`: the loaded plan (windows, links, the head's requests and batching);
- :mod:`~homering.agent.forwarding`: the link threads (frames through the windows);
- :mod:`~homering.agent.generation`: one :class:`~homering.agent.generation.HeadSession` per request;
- :mod:`~homering.agent.profiling`: device profiles and link probes;
- :mod:`~homering.agent.telemetry`: statistics, the heartbeat, the head's stream history.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import socket
import uuid
from pathlib import Path

import aiomqtt
import psutil

from homering.agent.forwarding import Forwarder
from homering.agent.generation import RING_STALL_FACTOR, RING_STALL_MIN_S, RING_TIMEOUT_S, Generator, ring_stall_s
from homering.agent.loading import ModelSource, PlanLoader
from homering.agent.profiling import Profiler, probe_link
from homering.agent.ring import Ring
from homering.agent.slots import Interrupted
from homering.agent.speculative import Drafters
from homering.agent.telemetry import HISTORY_REQUESTS, STATS_INTERVAL_S, Heartbeat, StreamHistory
from homering.errors import HomeringError
from homering.integrations.homeassistant import agent_configs, clear_discovery, publish_discovery
from homering.tasks import Tasks
from homering.transport import mqtt
from homering.transport.bus import Bus, Received
from homering.transport.links import LinkServer
from homering.wire import (
    AgentProfile,
    AgentState,
    AgentStats,
    AgentStatus,
    CancelJob,
    Codec,
    ControllerState,
    ControllerStatus,
    GenerateJob,
    LinkProbe,
    MalformedMessage,
    Message,
    MissingKey,
    Plan,
    StreamReplay,
    Topics,
    parse,
)
from homering.wire.security import KEY_GRACE_S, ClusterKey

__all__ = [
    "Agent",
    "Interrupted",
    "default_name",
    "ring_stall_s",
    "HISTORY_REQUESTS",
    "KEEPALIVE_S",
    "RING_STALL_FACTOR",
    "RING_STALL_MIN_S",
    "RING_TIMEOUT_S",
    "STATS_INTERVAL_S",
]

log = logging.getLogger("homering.agent")

KEEPALIVE_S = 2
"""MQTT keepalive, s: the broker publishes the last will about 1.5 × this after a silent cut-off."""


class Agent:
    """One ring member.

    Args:
        broker: the MQTT broker.
        name: unique agent name (topic-safe).
        threads: llama.cpp threads per window.
        data_port: TCP port of the data plane (0: any free port).
        host: address neighbours use to reach this agent.
        bind: address the data port listens on.
        release: drop each window from the page cache after using it (True), never (False: also no streamed
            tail in overflow mode), or as the plan says (None: whole windows in stream mode with k > 1, the
            layers beyond the plan's ``keep_bytes`` in overflow mode).
        ha_discovery: announce this agent to Home Assistant (MQTT discovery).
        stats_interval: seconds between :class:`AgentStats` publications.
        key: the cluster key (:mod:`homering.wire.security`): data-plane links must prove it, and plans,
            jobs, probes and the controller's status must be signed with it [default: an open cluster].
        model: this device's copy of the controller's model, when it is not at the controller's path (it
            must have the same fingerprint).
        local_model: use a local model file at all (``model`` or the controller's path); False: always
            download the windows from the controller.
        api_key: the controller's API key, for downloading windows (None: none sent).
        controller_url: the controller's API base URL for downloads [default: the one it announces, see
            :func:`~homering.transport.windows.reachable_url`].
        drafters: speculative decoding on the head (``--draft``; :mod:`homering.agent.speculative`).

    Its parts are public for tests and tools: :attr:`bus` (the MQTT connection and its routes),
    :attr:`tasks` (background tasks), :attr:`loader` (the loaded plan, ``loader.ring``), :attr:`profiler`.
    """

    def __init__(
        self,
        broker: mqtt.BrokerURL,
        *,
        name: str,
        threads: int,
        data_port: int = 0,
        host: str = "127.0.0.1",
        bind: str = "0.0.0.0",
        release: bool | None = None,
        ha_discovery: bool = False,
        stats_interval: float = STATS_INTERVAL_S,
        key: ClusterKey | None = None,
        model: Path | None = None,
        local_model: bool = True,
        api_key: str | None = None,
        controller_url: str | None = None,
        drafters: Drafters | None = None,
    ):
        self.broker, self.name, self.threads, self.key = broker, name, threads, key
        self.data_port, self.host, self.bind = data_port, host, bind
        self.ha_discovery = ha_discovery
        self._session = uuid.uuid4().hex[:16]  # this process, in its statuses and last-wills (NewestState)
        self._fatal: str | None = None  # why this agent cannot serve this cluster at all (run() ends)
        self._key_check: asyncio.Task[None] | None = None  # _give_up_without_key, once
        self._run_task: asyncio.Task[None] | None = None
        self._offered: Plan | None = None  # the latest plan on the broker
        self._controller: ControllerStatus | None = None
        self._applied_plan_id: str | None = None
        self._state: tuple[AgentState, str | None, str | None] = (AgentState.ONLINE, None, None)  # re-sent
        self.tasks = Tasks(f"agent {name}")
        self.bus = self._make_bus(broker, key)
        source = ModelSource(
            broker.host, model=model, local_model=local_model, api_key=api_key, controller_url=controller_url
        )
        self.loader = PlanLoader(
            name,
            threads=threads,
            key=key,
            source=source,
            release=release,
            tasks=self.tasks,
            report=self.report,
            controller_api=self._controller_api,
        )
        self.profiler = Profiler(
            threads=threads,
            source=source,
            tasks=self.tasks,
            report=self.report,
            controller=lambda: self._controller,
            profiled=self._publish_profile,
        )
        self.history = StreamHistory(self._publish, self.tasks)
        self.drafters = drafters or Drafters()
        self.generator = Generator(name, self._ring, self.history, self.tasks, session=self.drafters.session)
        self.forwarder = Forwarder(name, self._ring)
        self.heartbeat = Heartbeat(name, self._ring, self._publish, stats_interval)
        self._routes()

    def _make_bus(self, broker: mqtt.BrokerURL, key: ClusterKey | None) -> Bus:
        """This agent's MQTT connection: signed with ``key``, its will signed anew for each connection."""
        return Bus(
            broker,
            Codec(key),
            identifier=f"homering-agent-{self.name}",
            will=self._will,
            keepalive=KEEPALIVE_S,
            on_refused=self._refused,
        )

    def _ring(self) -> Ring | None:  # the loaded plan, for the parts that run it
        return self.loader.ring

    def _controller_api(self) -> str | None:  # where the controller serves window downloads
        return self._controller.api if self._controller is not None else None

    def _routes(self) -> None:
        me = self.name
        self.bus.route(Topics.CONTROLLER, ControllerStatus, self._on_controller)
        self.bus.route(Topics.PLAN, Plan, self._on_plan)
        self.bus.route(Topics.generate(me), GenerateJob, lambda rx: self.tasks.spawn(self.generator.serve(rx.message)))
        self.bus.route(Topics.probe(me), LinkProbe, lambda rx: self.tasks.spawn(self._probe(rx.message)))
        self.bus.route(Topics.cancel(me), CancelJob, self._on_cancel)
        self.bus.route(Topics.replay(me), StreamReplay, lambda rx: self.history.replay(rx.message))
        self.bus.on_connect(self._announce)
        self.bus.on_leave(self._goodbye)

    # ------------------------------------------------------------ lifecycle
    def profile(self) -> AgentProfile:
        """This agent's profile now (retained on its ``profile`` topic)."""
        vm = psutil.virtual_memory()
        return AgentProfile(
            name=self.name,
            host=self.host,
            data_port=self.data_port,
            pid=os.getpid(),
            os=platform.system().lower(),
            cpu_count=os.cpu_count() or 1,
            threads=self.threads,
            ram_total=vm.total,
            ram_available=vm.available,
            device=self.profiler.device,
        )

    def stats(self) -> AgentStats:
        """This agent's telemetry now (see :func:`~homering.agent.telemetry.agent_stats`)."""
        return self.heartbeat.snapshot()

    async def run(self) -> None:
        """Serve until cancelled.

        When the broker goes away the agent keeps its windows and its data plane (a request in flight
        finishes), reconnects with backoff, and publishes its retained state again.

        Raises:
            HomeringError: the broker is unreachable at start, or the cluster has a key and this agent none.
        """
        server = LinkServer(self.bind, self.data_port, self.forwarder.serve, key=self.key)
        self.data_port = server.port
        self._run_task = asyncio.current_task()
        try:
            await self.bus.run()
        except asyncio.CancelledError:
            if self._fatal:
                raise HomeringError(self._fatal) from None
            raise
        finally:
            self.tasks.cancel_all()
            server.close()
            self.generator.close()
            ring = self.loader.ring
            if ring is not None:
                ring.shutdown(timeout=5.0)
            self.drafters.close()

    async def _announce(self, reconnected: bool) -> None:
        """Publish this agent's retained profile and status (again, after a reconnect)."""
        await self._publish_profile()
        await self._publish(Topics.status(self.name), self._status_message(*self._state), retain=True)
        if self.ha_discovery and self.bus.client is not None:
            await publish_discovery(self.bus.client, agent_configs(self.name))
        if reconnected:
            self.history.republish()
        else:
            log.info("agent %s up: data port %d, broker %s", self.name, self.data_port, self.broker)
            self.tasks.spawn(self.heartbeat.run(), name="heartbeat")

    async def _goodbye(self) -> None:
        """A clean exit sends no last will: say goodbye ourselves (a lost broker or a crash is no exit)."""
        if self.ha_discovery and self.bus.client is not None:  # leaving for good
            await clear_discovery(self.bus.client, agent_configs(self.name))
        await self._publish(Topics.status(self.name), self._status_message(AgentState.OFFLINE), retain=True)

    def _will(self) -> aiomqtt.Will:  # signed anew for each connection (see NewestState)
        return aiomqtt.Will(
            Topics.status(self.name),
            self.bus.codec.encode(self._status_message(AgentState.OFFLINE)),
            qos=1,
            retain=True,
        )

    # ------------------------------------------------------------ publishing
    async def _publish(self, topic: str, msg: Message, *, qos: int = 1, retain: bool = False) -> bool:
        """Publish now, or not at all while the broker is away (what matters is published on reconnect)."""
        return await self.bus.publish(topic, msg, qos=qos, retain=retain, wait=False)

    async def _publish_profile(self) -> None:
        await self._publish(Topics.profile(self.name), self.profile(), retain=True)

    async def report(self, state: AgentState, plan_id: str | None = None, detail: str | None = None) -> None:
        """Publish this agent's status (retained); remembered, and published again after a reconnect."""
        self._state = (state, plan_id, detail)
        await self._publish(Topics.status(self.name), self._status_message(state, plan_id, detail), retain=True)

    def _status_message(self, state: AgentState, plan_id: str | None = None, detail: str | None = None) -> AgentStatus:
        return AgentStatus(name=self.name, session=self._session, state=state, plan_id=plan_id, detail=detail)

    # ------------------------------------------------------------ routes
    def _on_controller(self, rx: Received) -> None:
        self._controller = rx.message
        self.profiler.consider(rx.message)
        self._maybe_apply_plan()

    def _on_plan(self, rx: Received) -> None:
        self._offered = rx.message
        self._maybe_apply_plan()

    def _on_cancel(self, rx: Received) -> None:
        cancel: CancelJob = rx.message
        ring = self.loader.ring
        if ring is not None:
            ring.cancel(cancel.request_id, interrupt=cancel.interrupt)

    async def _probe(self, probe: LinkProbe) -> None:
        """Measure the data-plane link to the head and report it."""
        await self._publish(Topics.probe_result(self.name), await probe_link(probe, self.key))

    def _maybe_apply_plan(self) -> None:
        """Load the offered plan once the live controller vouches for it.

        A retained plan may be stale (left by a controller that is gone); the controller names the plan it
        stands for in its status before it publishes it, so only a plan whose id the controller's latest
        status carries is loaded, and only once.
        """
        plan, ctl = self._offered, self._controller
        if plan is None or ctl is None or ctl.plan_id != plan.plan_id:
            return
        if ctl.state not in (ControllerState.PLANNING, ControllerState.READY) or plan.plan_id == self._applied_plan_id:
            return
        self._applied_plan_id = plan.plan_id
        self.loader.offer(plan)

    def _refused(self, topic: str, exc: MalformedMessage) -> None:
        """A message the bus dropped: a signed controller status or plan while this agent has no key starts
        the countdown of :meth:`_give_up_without_key`."""
        ref = parse(topic)
        if not isinstance(exc, MissingKey) or ref is None or ref.kind not in ("controller", "plan"):
            return
        if self._controller is None and self._key_check is None and self._run_task is not None:
            self._key_check = self.tasks.spawn(self._give_up_without_key(str(exc)), name="key check")

    async def _give_up_without_key(self, why: str) -> None:
        """A signed status or plan arrived and this agent has no key. It may be a stale retained copy of an
        earlier keyed cluster (a live keyless controller replaces it at once); if no status this agent can
        read follows within :data:`~homering.wire.security.KEY_GRACE_S`, the cluster is keyed and this agent
        can never join it: :meth:`run` ends with one line that says so."""
        await asyncio.sleep(KEY_GRACE_S)
        if self._controller is None and self._run_task is not None:
            self._fatal = (
                f"the cluster on {self.broker} has a cluster key and this agent has none ({why}): "
                f"give it the same key with --key-file FILE or HOMERING_CLUSTER_KEY"
            )
            self._run_task.cancel()


def default_name() -> str:
    """``<hostname>-<pid>``: unique enough on a LAN, readable in tables."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"[:64]

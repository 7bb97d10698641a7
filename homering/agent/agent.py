"""``homering agent``: one device of the ring.

An agent publishes its profile and status over MQTT, waits for a plan,
slices and loads its layer windows, and serves its part of the ring on a TCP
data port: frames from its predecessor go through its window and on to its
successor. The head (the ring's last agent) also runs the generation loop:
it sends token ids to the ring's first agent, gets logits back through its own
last window, samples, and streams tokens to the client over MQTT.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import logging
import os
import platform
import queue
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import numpy as np
import psutil

from homering.transport import mqtt
from homering.integrations.homeassistant import agent_configs, clear_discovery, publish_discovery
from homering.transport.links import LinkServer, connect_link, measure_link, recv_group, send_frame, send_group
from homering.rate import WorkRate
from homering.wire import (
    AgentProfile, AgentStats, AgentStatus, CancelJob, ControllerStatus, DeviceProfile, Frame, FrameError, FrameKind,
    GenerateJob, LinkProbe, LinkReport, MalformedMessage, MissingKey, Plan, StreamEvent, StreamReplay, Topics,
    WindowAssignment, WindowStats,
)
from homering.wire.security import KEY_GRACE_S, ClusterKey
from homering.transport.windows import (WindowClient, cached, matches, model_info, plan_files, prune_cache,
                                      reachable_url, remove)
from homering.engine.sampling import SamplerChain, StopMatcher
from homering.engine.pages import WindowPages, trim_heap
from homering.engine.window import DecodeError, LayerWindow
from homering.errors import HomeringError
from homering.models.gguf_info import fingerprint
from homering.models.slicing import Role, WindowSpec, slice_window

log = logging.getLogger("homering.agent")

RING_TIMEOUT_S = 120.0  # the head gives up on a ring that has not answered for this long (no prediction)
RING_STALL_MIN_S = 5.0  # ... or, with the plan's prediction, for this long plus a generous multiple of it
RING_STALL_FACTOR = 20.0
STATS_INTERVAL_S = 1.0  # AgentStats double as the heartbeat the controller watches
KEEPALIVE_S = 2  # MQTT keepalive: the broker publishes the last will ~1.5 × this after a silent cut-off
HISTORY_REQUESTS = 32  # requests whose stream events the head keeps for a StreamReplay


class Interrupted(Exception):
    """The request's ring broke or was replaced (the controller resumes it on the new ring)."""


@dataclass
class _Loaded:
    """What an agent holds for the current plan."""

    plan: Plan
    position: int
    windows: list[LayerWindow]
    successor: socket.socket | None = None
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    queues: dict[int, queue.Queue] = field(default_factory=dict)  # head: frames back, by request number
    pages: list[WindowPages] = field(default_factory=list)  # page-cache advice per window (k > 1)
    release: bool = False  # drop each window from the page cache after use
    active: dict[int, str] = field(default_factory=dict)  # head: seq_id -> request id being generated
    cancelled: set[str] = field(default_factory=set)  # head: requests to stop at the next token
    tokens_generated: int = 0  # head: tokens sampled under this plan
    rate: WorkRate = field(default_factory=WorkRate)  # the telemetry's tokens_per_s (head: sampled; else rows)
    stats: list[WindowStats] = field(default_factory=list)  # per window, in round order
    thinking: set[int] = field(default_factory=set)  # head: requests sampling their next token
    outstanding: dict[int, int] = field(default_factory=dict)  # head: frames in the ring, by request
    pending: list[Frame] = field(default_factory=list)  # head: frames waiting for the thinking requests
    numbers: dict[str, int] = field(default_factory=dict)  # head: request id -> its request number (queues)
    interrupted: set[str] = field(default_factory=set)  # head: requests to end with "interrupted"
    users: int = 0  # threads running frames through the windows (link threads, generation loops)
    closing: bool = False
    idle: threading.Condition = field(default_factory=threading.Condition)
    tag: int = 0  # the plan's tag (Plan.tag), which HELLO frames of its links carry

    def __post_init__(self) -> None:
        self.tag = self.plan.tag
        me = self.plan.ring[self.position]
        self.stats = [WindowStats(start=w.start, end=w.end, round=w.round) for w in me.windows]

    def timed(self, round_: int, n_tokens: int, fn, *args):
        """Call ``fn(*args)`` (a window's forward) and add its time to round ``round_``'s :class:`WindowStats`."""
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            st = self.stats[round_]
            st.forwards += 1
            st.tokens += n_tokens
            if not self.is_head:
                self.rate.add(n_tokens)
            st.compute_ms += (time.perf_counter() - t0) * 1000

    @property
    def is_head(self) -> bool:
        return self.position == len(self.plan.ring) - 1

    def send(self, frames: list[Frame]) -> None:
        """Send frames to the successor as one group."""
        with self.send_lock:
            send_group(self.successor, frames)

    # The head's batching of decode steps. The requests in flight are spread over as many groups as the
    # ring has devices that can compute at once (Plan.pipeline_depth), so that every such device has a
    # group to work on (the pipeline, PRIMA.CPP's piped ring); requests beyond that share groups, whose tokens share each window's llama_decode (llama.cpp
    # server's continuous batching). A group is sent when it is full, or when no request whose frames
    # came back ("thinking": sampling its next token) could still join it.
    def submit(self, request: int, frames: list[Frame]) -> None:
        """Queue ``request``'s frames; send the queued group once it is full or no request is thinking."""
        with self.send_lock:
            self.thinking.discard(request)
            self.outstanding[request] = self.outstanding.get(request, 0) + len(frames)
            self.pending.extend(frames)
            depth = self.plan.pipeline_depth or len(self.plan.ring)  # devices that can compute at once
            cap = -(-len(self.active) // depth)  # requests per group: one group per such device
            if not self.thinking or len({f.header.request_id for f in self.pending}) >= cap:
                self._flush()

    def deliver(self, request: int, frame: Frame) -> None:
        """A frame of ``request`` came back to the head: hand it to the request's generation loop."""
        back = self.queues.get(request)
        with self.send_lock:
            left = self.outstanding.get(request, 0) - 1
            if back is not None and left <= 0:
                self.thinking.add(request)  # it will sample and submit (or leave) next
            if left > 0:
                self.outstanding[request] = left
            else:
                self.outstanding.pop(request, None)
        if back is not None:
            back.put(frame)

    def leave(self, request: int) -> None:
        """``request`` is over: stop waiting for it (never raises: a broken link is the next request's news)."""
        with self.send_lock:
            self.thinking.discard(request)
            self.outstanding.pop(request, None)
            if not self.thinking:
                try:
                    self._flush()
                except OSError as exc:
                    self.pending.clear()
                    log.debug("could not send the waiting frames: %s", exc)

    def _flush(self) -> None:
        if self.pending:
            frames, self.pending = self.pending, []
            send_group(self.successor, frames)

    def after_window(self, round_: int) -> None:
        """Window ``round_`` is done and its output handed off: advise the kernel about the windows.

        PRIMA.CPP's prefetching: read the next round's window now, so the disk
        works while the rest of the ring computes (``WILLNEED``, does not
        block). With ``release`` (devices whose windows overflow their RAM),
        first drop the window just used, so the kernel evicts it rather than
        the next one. See :mod:`homering.engine.pages`.
        """
        if len(self.pages) > 1:
            if self.release:
                self.pages[round_].release()
            self.pages[(round_ + 1) % len(self.pages)].prefetch()

    def enter(self) -> bool:
        """Start using the windows (a link thread or a generation loop); False once the plan is closing."""
        with self.idle:
            if self.closing:
                return False
            self.users += 1
            return True

    def exit(self) -> None:
        with self.idle:
            self.users -= 1
            self.idle.notify_all()

    def interrupt(self, request_ids=None) -> None:
        """End these requests (all when None) with ``interrupted`` at their next ring step."""
        with self.send_lock:
            ids = set(self.active.values()) if request_ids is None else set(request_ids) & set(self.active.values())
            self.interrupted |= ids
            for rid in ids:
                back = self.queues.get(self.numbers.get(rid, -1))
                if back is not None:
                    back.put(None)  # wakes _ring

    def shutdown(self, timeout: float = 30.0) -> None:
        """Interrupt every request, wait until no thread uses the windows any more, then close them."""
        with self.idle:
            self.closing = True
        self.interrupt()
        if self.successor is not None:  # unblocks a send to a neighbour that is gone
            with contextlib.suppress(OSError):
                self.successor.shutdown(socket.SHUT_RDWR)
        with self.idle:
            if not self.idle.wait_for(lambda: self.users == 0, timeout):
                log.warning("windows still in use after %.0f s; closing them anyway", timeout)
        self.close()

    def close(self) -> None:
        if self.successor is not None:
            self.successor.close()
        for w in self.windows:
            w.close()
        for p in self.pages:
            p.close()
        self.pages.clear()


class Agent:
    """One ring member.

    Args:
        broker: the MQTT broker.
        name: unique agent name (topic-safe).
        threads: llama.cpp threads per window.
        data_port: TCP port of the data plane (0: any free port).
        host: address neighbours use to reach this agent.
        bind: address the data port listens on.
        release: drop each window from the page cache after using it (True),
            never (False), or as the plan says (None: the planner asks for it
            on devices whose windows overflow their RAM).
        ha_discovery: announce this agent to Home Assistant (MQTT discovery).
        stats_interval: seconds between :class:`AgentStats` publications.
        key: the cluster key (:mod:`homering.wire.security`): data-plane links must prove it, and plans,
            jobs, probes and the controller's status must be signed with it [default: an open cluster].
        model: this device's copy of the controller's model, when it is not at the
            controller's path (it must have the same fingerprint).
        local_model: use a local model file at all (``model`` or the controller's path);
            False: always download the windows from the controller.
        api_key: the controller's API key, for downloading windows (None: none sent).
        controller_url: the controller's API base URL for downloads [default: the one
            it announces, see :func:`~homering.transport.windows.reachable_url`].

    Windows: an agent with the model slices its windows itself; one without
    downloads them from the controller (:mod:`homering.transport.windows`). Either
    way every window file is checked against the plan's SHA-256.
    """

    def __init__(self, broker: mqtt.BrokerURL, *, name: str, threads: int, data_port: int = 0,
                 host: str = "127.0.0.1", bind: str = "0.0.0.0", release: bool | None = None,
                 ha_discovery: bool = False, stats_interval: float = STATS_INTERVAL_S,
                 key: ClusterKey | None = None, model: Path | None = None, local_model: bool = True,
                 api_key: str | None = None, controller_url: str | None = None):
        self.broker = broker
        self.key = key
        self._session = uuid.uuid4().hex[:16]  # this process, in its statuses and last-wills (NewestState)
        self._fatal: str | None = None  # why this agent cannot serve this cluster at all (run() ends)
        self._key_check: asyncio.Task | None = None  # _give_up_without_key, once
        self._run_task: asyncio.Task | None = None
        self.model = Path(model) if model is not None else None
        self.local_model = local_model
        self.api_key = api_key
        self.controller_url = controller_url
        self.ha_discovery = ha_discovery
        self.stats_interval = stats_interval
        self.release = release
        self.name = name
        self.threads = threads
        self.data_port = data_port
        self.host = host
        self.bind = bind
        self._loaded: _Loaded | None = None
        self._plan_task: asyncio.Task | None = None
        self._plan_seq = 0  # plans offered so far; a load whose number is not the latest stops
        self._offered: Plan | None = None              # the latest plan on the broker
        self._controller: ControllerStatus | None = None
        self._applied_plan_id: str | None = None
        self._request_numbers = itertools.count(1)
        self._mqtt: aiomqtt.Client | None = None
        self._tasks: set[asyncio.Task] = set()
        self.device: DeviceProfile | None = None
        self._profiling: str | None = None   # fingerprint being profiled
        self._state: tuple[str, str | None, str | None] = ("online", None, None)  # last status, re-sent on reconnect
        self._history: dict[str, list[StreamEvent]] = {}  # head: recent requests' events, for StreamReplay

    # ------------------------------------------------------------ lifecycle
    def profile(self) -> AgentProfile:
        vm = psutil.virtual_memory()
        return AgentProfile(name=self.name, host=self.host, data_port=self.data_port, pid=os.getpid(),
                            os=platform.system().lower(), cpu_count=os.cpu_count() or 1,
                            threads=self.threads, ram_total=vm.total, ram_available=vm.available,
                            device=self.device)

    async def run(self) -> None:
        """Serve until cancelled.

        When the broker goes away the agent keeps its windows and its data
        plane (a request in flight finishes), reconnects with backoff, and
        publishes its retained state again.

        Raises:
            HomeringError: the broker is unreachable at start.
        """
        server = LinkServer(self.bind, self.data_port, self._serve_link, key=self.key)
        self.data_port = server.port
        def will() -> aiomqtt.Will:  # signed anew for each connection (see NewestState)
            return aiomqtt.Will(Topics.status(self.name), self._status_message("offline").dump(self.key), qos=1,
                                retain=True)

        stats = None

        async def session(client: aiomqtt.Client, reconnected: bool) -> None:
            nonlocal stats
            self._mqtt = client
            await self._announce(client)
            if reconnected:
                self._republish_history()
            else:
                log.info("agent %s up: data port %d, broker %s", self.name, self.data_port, self.broker)
                stats = self._spawn(self._publish_stats())
            try:
                async for message in client.messages:
                    self._dispatch(message)
            finally:  # a clean exit sends no last-will: say goodbye ourselves
                self._mqtt = None
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    if asyncio.current_task().cancelling():
                        if self.ha_discovery:  # leaving for good (a lost broker or a crash is no exit)
                            await asyncio.wait_for(clear_discovery(client, agent_configs(self.name)), 5.0)
                        await asyncio.wait_for(self._publish_status(client, "offline"), 5.0)

        self._run_task = asyncio.current_task()
        try:
            await mqtt.keep_connected(self.broker, session, identifier=f"homering-agent-{self.name}", will=will,
                                      keepalive=KEEPALIVE_S)
        except asyncio.CancelledError:
            if self._fatal:
                raise HomeringError(self._fatal) from None
            raise
        finally:
            if stats is not None:
                stats.cancel()
            server.close()
            if self._loaded:
                self._loaded.close()

    async def _announce(self, client: aiomqtt.Client) -> None:
        """Subscribe, and publish this agent's retained profile and status (again, after a reconnect)."""
        for topic in (Topics.CONTROLLER, Topics.PLAN, Topics.generate(self.name), Topics.probe(self.name),
                      Topics.cancel(self.name), Topics.replay(self.name)):
            await client.subscribe(topic, qos=1)
        await client.publish(Topics.profile(self.name), self.profile().dump(self.key), qos=1, retain=True)
        await self._publish_status(client, *self._state)
        if self.ha_discovery:
            await publish_discovery(client, agent_configs(self.name))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _dispatch(self, message: aiomqtt.Message) -> None:
        """Route one MQTT message; malformed ones are logged and dropped."""
        topic = message.topic.value
        try:
            if message.topic.matches(Topics.PLAN):
                if not message.payload:
                    return  # a cleared retained plan
                self._offered = Plan.load(message.payload, key=self.key)
                self._maybe_apply_plan()
            elif message.topic.matches(Topics.generate(self.name)):
                job = GenerateJob.load(message.payload, key=self.key)
                self._spawn(self._generate(job))
            elif message.topic.matches(Topics.CONTROLLER):
                if message.payload:
                    self._controller = ControllerStatus.load(message.payload, key=self.key)
                    self._on_controller(self._controller)
                    self._maybe_apply_plan()
            elif message.topic.matches(Topics.probe(self.name)):
                self._spawn(self._probe(LinkProbe.load(message.payload, key=self.key)))
            elif message.topic.matches(Topics.cancel(self.name)):
                cancel = CancelJob.load(message.payload, key=self.key)
                loaded = self._loaded
                if loaded is not None and cancel.request_id in loaded.active.values():
                    if cancel.interrupt:
                        loaded.interrupt([cancel.request_id])
                    else:
                        loaded.cancelled.add(cancel.request_id)
            elif message.topic.matches(Topics.replay(self.name)):
                replay = StreamReplay.load(message.payload, key=self.key)
                events = [e for e in self._history.get(replay.request_id, ())
                          if e.attempt == replay.attempt and e.index >= replay.from_index]
                if events:
                    self._spawn(self._publish_events(Topics.stream(replay.request_id), events))
        except MissingKey as exc:
            log.warning("dropped malformed message on %s: %s", topic, exc)
            if (message.topic.matches(Topics.CONTROLLER) or message.topic.matches(Topics.PLAN)) \
                    and self._controller is None and self._key_check is None and self._run_task is not None:
                self._key_check = self._spawn(self._give_up_without_key(str(exc)))
        except MalformedMessage as exc:
            log.warning("dropped malformed message on %s: %s", topic, exc)

    async def _give_up_without_key(self, why: str) -> None:
        """A signed status or plan arrived and this agent has no key. It may be a stale retained copy of
        an earlier keyed cluster (a live keyless controller replaces it at once); if no status this agent
        can read follows within :data:`~homering.wire.security.KEY_GRACE_S`, the cluster is keyed and this
        agent can never join it: :meth:`run` ends with one line that says so."""
        await asyncio.sleep(KEY_GRACE_S)
        if self._controller is None and self._run_task is not None:
            self._fatal = (f"the cluster on {self.broker} has a cluster key and this agent has none ({why}): "
                           f"give it the same key with --key-file FILE or HOMERING_CLUSTER_KEY")
            self._run_task.cancel()

    def _maybe_apply_plan(self) -> None:
        """Load the offered plan once the live controller vouches for it.

        A retained plan may be stale (left by a controller that is gone); the
        controller names the plan it stands for in its status before it
        publishes it, so only a plan whose id the controller's latest status
        carries is loaded, and only once.
        """
        plan, ctl = self._offered, self._controller
        if plan is None or ctl is None or ctl.state not in ("planning", "ready") or ctl.plan_id != plan.plan_id:
            return
        if plan.plan_id == self._applied_plan_id:
            return
        self._applied_plan_id = plan.plan_id
        self._plan_seq += 1
        self._plan_task = self._spawn(self._apply_plan(plan, self._plan_seq, self._plan_task))

    async def _status(self, state: str, plan_id: str | None = None, detail: str | None = None) -> None:
        """Publish this agent's status (retained); remembered, and published again after a reconnect."""
        self._state = (state, plan_id, detail)
        if self._mqtt is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._publish_status(self._mqtt, state, plan_id, detail)

    async def _publish_status(self, client: aiomqtt.Client, state: str, plan_id: str | None = None,
                              detail: str | None = None) -> None:
        await client.publish(Topics.status(self.name), self._status_message(state, plan_id, detail).dump(self.key),
                             qos=1, retain=True)

    def _status_message(self, state: str, plan_id: str | None = None, detail: str | None = None) -> AgentStatus:
        return AgentStatus(name=self.name, session=self._session, state=state, plan_id=plan_id, detail=detail)

    def stats(self) -> AgentStats:
        """This agent's telemetry now; ``tokens_per_s`` is the rate of its most recent run of work (tokens
        sampled on the head, rows computed elsewhere; see :class:`~homering.rate.WorkRate`): during an
        answer its current rate, after it that answer's (not 0.0 as soon as an interval passes without work)."""
        loaded = self._loaded
        proc = psutil.Process()
        mem = proc.memory_info()
        anon = max(0, mem.rss - getattr(mem, "shared", 0))
        if loaded is None:
            return AgentStats(name=self.name, rss_bytes=mem.rss, anon_bytes=anon)
        return AgentStats(
            name=self.name, plan_id=loaded.plan.plan_id, layers=sum(w.end - w.start for w in loaded.stats),
            windows=[w.model_copy() for w in loaded.stats], tokens_generated=loaded.tokens_generated,
            tokens_per_s=loaded.rate.per_s(),
            rss_bytes=mem.rss, anon_bytes=anon, requests_active=len(loaded.active))

    async def _publish_stats(self) -> None:
        """Publish :class:`AgentStats` (retained) every ``stats_interval`` seconds."""
        while True:
            stats = self.stats()
            client = self._mqtt
            if client is not None:  # None while the broker is away
                with contextlib.suppress(aiomqtt.MqttError):
                    await client.publish(Topics.stats(self.name), stats.dump(self.key), qos=0, retain=True)
            await asyncio.sleep(self.stats_interval)

    # ------------------------------------------------------------ profile and link probes
    def _on_controller(self, status: ControllerStatus) -> None:
        """Profile this device for the controller's model (once per model; cached on disk)."""
        fp, path = status.model_fingerprint, status.model_path
        if status.state == "offline" or not fp or not path or fp == self._profiling:  # a gone controller's model
            return
        if self.device is not None and self.device.model_fingerprint == fp:
            return
        self._profiling = fp
        self._spawn(self._profile(status))

    def _local_model(self, model_path: str, fp: str) -> Path | None:
        """This device's copy of the model with fingerprint ``fp``: ``--model``, else the controller's path
        when that file is here; None when there is none (or ``local_model`` is off)."""
        if not self.local_model:
            return None
        path = self.model or Path(model_path)
        if not path.is_file():
            return None
        if fingerprint(path) != fp:
            log.warning("model file %s is not the controller's model (fingerprint differs): not used", path)
            return None
        return path

    def _window_client(self, api: str | None, what: str) -> WindowClient:
        """A client for the controller's window downloads.

        Raises:
            HomeringError: the controller serves no windows (it runs without --api-port).
        """
        url = self.controller_url or (reachable_url(api, self.broker.host) if api else None)
        if url is None:
            raise HomeringError(f"{what}: this device has no copy of the model and the controller serves no "
                                f"windows (start it with --api-port, or give this agent --model)")
        return WindowClient(url, self.api_key)

    async def _profile(self, status: ControllerStatus) -> None:
        from homering.profiler import profile_device

        model_path, fp = status.model_path, status.model_fingerprint
        try:
            local = await asyncio.to_thread(self._local_model, model_path, fp)
            if local is not None:
                device = await asyncio.to_thread(profile_device, local, threads=self.threads)
            else:
                if status.model_facts is None:
                    raise HomeringError(f"model file {model_path} is not on this device")
                info = model_info(status.model_facts, model_path, fp)
                with self._window_client(status.api, f"model file {model_path} is not on this device") as client:
                    def probe_file(spec: WindowSpec) -> Path:
                        wf = client.probe_window(spec)
                        return client.fetch(wf.sha256, wf.size, f"probe {spec.label()}")

                    device = await asyncio.to_thread(profile_device, None, threads=self.threads, info=info,
                                                     windows=probe_file)
            trim_heap()  # the probe windows' buffers: freed, but glibc would keep them
            if device.model_fingerprint != fp:
                raise HomeringError(f"model file {model_path} does not match the controller's model")
        except HomeringError as exc:
            log.error("cannot profile this device: %s", exc)
            self._profiling = None
            await self._status("error", detail=f"cannot profile: {exc}")
            return
        if self._controller is not None and self._controller.model_fingerprint != fp:
            log.info("profiled for a model the controller no longer serves; not published")
            if self._profiling == fp:
                self._profiling = None
            return
        self.device = device
        log.info("profiled: %.2f ms/layer, output %.2f ms, disk %.2f GB/s, RAM %.1f GiB (%s)",
                 device.cpu_ms_per_layer, device.cpu_ms_output, device.disk_gbps, device.ram_gib,
                 f"measured in {(device.profile_ms or 0) / 1000:.1f} s" + (", cached" if device.cached else ""))
        if self._mqtt is not None:  # else the next reconnect publishes it
            with contextlib.suppress(aiomqtt.MqttError):
                await self._mqtt.publish(Topics.profile(self.name), self.profile().dump(self.key), qos=1, retain=True)

    async def _probe(self, probe: LinkProbe) -> None:
        """Measure the data-plane link to the head and report it."""
        try:
            link_ms, link_mbps = await asyncio.to_thread(measure_link, probe.host, probe.port, key=self.key)
            report = LinkReport(probe_id=probe.probe_id, link_ms=link_ms, link_mbps=link_mbps)
        except ConnectionError as exc:
            report = LinkReport(probe_id=probe.probe_id, error=str(exc))
        if self._mqtt is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._mqtt.publish(Topics.probe_result(self.name), report.dump(self.key), qos=1)

    # ------------------------------------------------------------ plans
    async def _apply_plan(self, plan: Plan, seq: int, previous: asyncio.Task | None = None) -> None:
        """Load ``plan`` (the ``seq``-th offered), after ``previous`` (an earlier load) has stopped.

        Loads are never cancelled midway (their threads cannot be): a load
        whose plan has been replaced meanwhile stops at its next step and
        closes what it loaded.
        """
        if previous is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await previous

        def superseded() -> bool:
            return seq != self._plan_seq

        if superseded():
            return
        old, self._loaded = self._loaded, None
        if old is not None:  # requests in flight end with "interrupted"; the controller resumes them
            await asyncio.to_thread(old.shutdown)
        position = plan.position(self.name)
        if position is None:
            await self._status("online", plan.plan_id, "not in the plan")
            return
        await self._status("loading", plan.plan_id)
        loaded = None
        try:
            trim_heap()  # the previous plan's contexts
            windows = await asyncio.to_thread(self._load_windows, plan, position)
            me = plan.ring[position]
            release = self.release if self.release is not None else me.release
            loaded = _Loaded(plan, position, windows, release=release)
            if len(windows) > 1 and WindowPages.supported:  # macOS has no fadvise: no prefetch there
                loaded.pages = [WindowPages(w.path) for w in windows]
            if len(plan.ring) > 1 and not superseded():
                nxt = plan.ring[(position + 1) % len(plan.ring)]
                loaded.successor = await asyncio.to_thread(connect_link, nxt.host, nxt.data_port,
                                                           key=self.key, give_up=superseded)
                send_frame(loaded.successor, Frame.hello(loaded.tag))
            if superseded():
                loaded.close()
                return
            self._loaded = loaded
        except (HomeringError, ConnectionError, OSError, ValueError) as exc:
            if loaded is not None:
                loaded.close()
            if superseded():
                return
            log.error("cannot load plan %s: %s", plan.plan_id, exc)
            await self._status("error", plan.plan_id, str(exc))
            return
        log.info("plan %s loaded: windows %s, %s", plan.plan_id,
                 [(w.start, w.end) for w in plan.ring[position].windows],
                 "head" if loaded.is_head else f"next {plan.ring[(position + 1) % len(plan.ring)].name}")
        await self._status("ready", plan.plan_id)
        try:  # the plan's windows stay, and as many bytes of recent others
            await asyncio.to_thread(prune_cache, plan_files(plan),
                                    spare_bytes=sum(w.size or 0 for a in plan.ring for w in a.windows))
        except OSError as exc:
            log.warning("could not prune the window cache: %s", exc)

    def _load_windows(self, plan: Plan, position: int) -> list[LayerWindow]:
        """Get this agent's window files (see :meth:`_window_file`) and open them (a worker thread).

        Raises:
            HomeringError: a window file cannot be had (no model here and no download, or a refused
                or corrupted download); llama.cpp cannot load a window.
        """
        local = self._local_model(plan.model_path, plan.model_fingerprint)
        client = None
        try:
            out = []
            for w in plan.ring[position].windows:
                role = Role.for_range(w.start, w.end, plan.n_layers)
                spec = WindowSpec(w.start, w.end, role)
                path = self._window_file(plan, w, spec, local)
                if path is None:  # download
                    if client is None:
                        client = self._window_client(self._controller.api if self._controller else None,
                                                     f"model file {plan.model_path} is not on this device")
                    path = client.fetch(w.sha256, w.size, spec.label())
                out.append(LayerWindow(path, takes_tokens=role.takes_tokens, gives_logits=role.gives_logits,
                                       n_ctx=plan.n_ctx, n_seq_max=plan.n_parallel, n_batch=plan.n_batch,
                                       n_threads=self.threads,
                                       n_gpu_layers=w.gpu_layers))
            return out
        finally:
            if client is not None:
                client.close()

    def _window_file(self, plan: Plan, w: WindowAssignment, spec: WindowSpec, local: Path | None) -> Path | None:
        """The checked file of window ``w``, or None when it must be downloaded.

        In order: a downloaded copy in the cache (by hash, checked); the window
        sliced from the local model, checked against the plan's hash (a
        mismatching slice, e.g. a corrupted cache file, is sliced again once);
        else None. A plan without hashes (an older controller) needs the model here.
        """
        label = spec.label()
        if w.sha256 is None:
            if local is None:
                raise HomeringError(f"model file {plan.model_path} is not on this device")
            return slice_window(local, spec, progress=False, model_fp=plan.model_fingerprint)
        hit = cached(w.sha256, w.size, label)
        if hit is not None:
            return hit
        if local is None:
            return None
        for attempt in range(2):
            path = slice_window(local, spec, progress=False, model_fp=plan.model_fingerprint)
            if matches(path, w.sha256, w.size):
                return path
            if spec.role is Role.WHOLE:
                break  # the model file itself: nothing to slice again
            log.warning("window %s sliced here (%s) does not match the plan's sha256: %s", label, path,
                        "slicing it again" if attempt == 0 else "it will be downloaded")
            remove(path)
        return None

    # ------------------------------------------------------------ data plane (worker threads)
    def _serve_link(self, sock: socket.socket) -> None:
        """Handle groups of frames from the predecessor, in order, until it disconnects (a link thread).

        A ring link starts with a HELLO frame naming the sender's plan; its
        frames run only while this agent has that plan loaded (frames a
        neighbour sent under an old plan would corrupt the new KV caches).
        """
        peer = sock.getpeername()
        tag = None
        dropped = 0
        try:
            while (group := recv_group(sock)) is not None:
                kind = group[0].header.kind
                if kind is FrameKind.PING:
                    send_frame(sock, Frame.pong())
                    continue
                if kind is FrameKind.HELLO:
                    tag = group[0].plan_tag
                    continue
                if kind is FrameKind.PONG:
                    continue
                loaded = self._loaded
                if loaded is None or loaded.tag != tag or not loaded.enter():
                    dropped += len(group)
                    if dropped == len(group):
                        log.warning("dropping frames from %s: sent under another plan than the one loaded", peer)
                    continue
                try:
                    self._handle_group(loaded, self._merge_waiting(loaded, sock, group))
                finally:
                    loaded.exit()
        except (FrameError, ConnectionError, OSError) as exc:
            log.warning("dropping data link from %s: %s", peer, exc)

    @staticmethod
    def _merge_waiting(loaded: _Loaded, sock: socket.socket, group: list[Frame]) -> list[Frame]:
        """Append the groups that already wait on the link (this device is the ring's bottleneck right
        now), up to ``n_batch`` tokens: they then share llama_decode calls instead of queueing."""
        if group[0].header.kind is not FrameKind.FORWARD:
            return group
        tokens = sum(f.header.n_tokens for f in group)
        while tokens < loaded.plan.n_batch and select.select([sock], [], [], 0)[0]:
            more = recv_group(sock)
            if more is None:
                break
            group = group + more
            tokens += sum(f.header.n_tokens for f in more)
        return group

    def _handle_group(self, loaded: _Loaded, group: list[Frame]) -> None:
        """Run a group of frames through this agent's windows and pass the results on, as one group.

        Piped-ring rounds (PRIMA.CPP §3.2): a FORWARD frame of round r runs
        this agent's r-th window. The head, which holds the last window of every
        round, sends round r's output back into the ring as round r + 1; after
        the last round it hands the logits to the request's generation loop.
        Consecutive FORWARD frames of the same round (several requests' tokens,
        or one prompt's micro-batches) share llama_decode calls
        (:meth:`LayerWindow.forward_many`).
        """
        last_round = len(loaded.windows) - 1
        outs: list[tuple[Frame, Frame]] = []  # (input, output)
        i = 0
        while i < len(group):
            h = group[i].header
            if h.kind is FrameKind.FORWARD and h.round <= last_round:
                j = i + 1
                while j < len(group) and group[j].header.kind is FrameKind.FORWARD and group[j].header.round == h.round:
                    j += 1
                run = group[i:j]
                outs.extend(zip(run, self._forward_run(loaded, run, last_round)))
                loaded.after_window(h.round)
                i = j
                continue
            out = group[i]
            if h.kind is FrameKind.FORWARD:
                out = Frame.error(h.request_id, h.seq_id, f"{self.name}: round {h.round} of a {last_round + 1}-round plan")
            elif h.kind is FrameKind.KV_REMOVE:
                try:
                    for w in loaded.windows:
                        w.kv_remove(h.seq_id, h.pos)
                except ValueError as exc:
                    out = Frame.error(h.request_id, h.seq_id, f"{self.name}: {exc}")
            outs.append((group[i], out))
            i += 1
        onward = []
        for frame_in, out in outs:
            h = frame_in.header
            if loaded.is_head and (out.header.kind is not FrameKind.FORWARD or h.round == last_round):
                loaded.deliver(h.request_id, out)
            else:
                onward.append(out)
        if onward and loaded.successor is not None:
            try:
                loaded.send(onward)
            except OSError as exc:
                log.warning("cannot reach the next agent: %s", exc)

    def _forward_run(self, loaded: _Loaded, run: list[Frame], last_round: int) -> list[Frame]:
        """FORWARD frames of one round through that round's window in shared batches; the output frames."""
        r = run[0].header.round
        items = [(f.payload, f.header.pos, f.header.seq_id) for f in run]
        try:
            results = loaded.timed(r, sum(f.header.n_tokens for f in run), loaded.windows[r].forward_many, items)
        except (DecodeError, ValueError) as exc:
            return [Frame.error(f.header.request_id, f.header.seq_id, f"{self.name}: {exc}") for f in run]
        outs = []
        for f, result in zip(run, results):
            h = f.header
            if loaded.is_head and r == last_round:  # the ring is closed: the logits go to the generation loop
                outs.append(Frame(h, result.logits))
            else:
                nxt = r + 1 if loaded.is_head else r
                outs.append(Frame.forward(h.request_id, h.seq_id, h.pos, result.hidden, nxt))
        return outs

    def _ring(self, loaded: _Loaded, request: int, frames: list[Frame]) -> np.ndarray | None:
        """Send frames into the ring; wait until each came back through the head's window.

        Returns the logits ((n_vocab,) float32) of the last frame's last token,
        or None for frames that carry no tokens.

        Raises:
            DecodeError: a window on the way failed (the ERROR frame's message).
            Interrupted: the request was interrupted, the ring did not answer
                in time (:func:`ring_stall_s`), or the link to the next agent failed.
        """
        back = loaded.queues[request]
        try:
            loaded.submit(request, frames)
        except OSError as exc:
            raise Interrupted(f"cannot reach the next agent: {exc}") from None
        logits = None
        for _ in frames:
            try:
                got = back.get(timeout=ring_stall_s(loaded.plan, frames))
            except queue.Empty:
                raise Interrupted(f"the ring did not answer within {ring_stall_s(loaded.plan, frames):.0f} s "
                                  f"(a data-plane timeout)") from None
            if got is None:
                raise Interrupted("interrupted")
            if got.header.kind is FrameKind.ERROR:
                raise DecodeError(got.payload)
            logits = got.payload if isinstance(got.payload, np.ndarray) else logits
        return logits

    def _forward(self, loaded: _Loaded, request: int, seq_id: int, tokens: np.ndarray, pos: int) -> np.ndarray:
        """Run ``tokens`` of sequence ``seq_id`` at ``pos`` through every window; return the last token's logits.

        A long prompt goes as back-to-back micro-batches of ``n_batch`` tokens,
        so the agents work on different chunks at once.
        """
        if len(loaded.plan.ring) == 1:  # every round is here: run the windows in turn
            x = tokens
            for r, w in enumerate(loaded.windows):
                out = loaded.timed(r, len(x), w.forward, x, pos, seq_id)
                x = out.hidden
            return out.logits
        n_batch = loaded.plan.n_batch
        frames = [Frame.forward(request, seq_id, pos + i, tokens[i:i + n_batch])
                  for i in range(0, len(tokens), n_batch)]
        return self._ring(loaded, request, frames)

    def _clear(self, loaded: _Loaded, request: int, seq_id: int) -> None:
        """Empty sequence ``seq_id`` of every window in the ring."""
        if len(loaded.plan.ring) == 1:
            for w in loaded.windows:
                w.kv_remove(seq_id, 0)
        else:
            self._ring(loaded, request, [Frame.kv_remove(request, seq_id, 0)])

    # ------------------------------------------------------------ generation (head)
    async def _generate(self, job: GenerateJob) -> None:
        """Serve one request on its own sequence; several run at once, one worker thread each.

        The events are numbered (``index``) and kept (:data:`HISTORY_REQUESTS`
        requests) so that they can be published again after a broker outage.
        """
        stream = Topics.stream(job.request_id)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        history: list[StreamEvent] = []
        self._history.pop(job.request_id, None)
        self._history[job.request_id] = history
        while len(self._history) > HISTORY_REQUESTS:
            self._history.pop(next(iter(self._history)))
        publisher = self._spawn(self._publish_events(stream, events))

        def emit(event: StreamEvent) -> None:
            event.attempt, event.index = job.attempt, len(history)
            history.append(event)
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            await asyncio.to_thread(self._generate_sync, job, emit)
        except (DecodeError, HomeringError, ConnectionError, OSError, ValueError, RuntimeError) as exc:
            log.warning("request %s failed: %s", job.request_id, exc)
            emit(StreamEvent(request_id=job.request_id, type="error", error=str(exc)))
        except Exception as exc:  # a bug: the request still ends, with an error, and frees its sequence
            log.exception("request %s failed", job.request_id)
            emit(StreamEvent(request_id=job.request_id, type="error", error=f"internal error: {exc!r}"))
        finally:
            # after the events emit() scheduled (call_soon_threadsafe): an error emitted just above came
            # after the end marker, and was never sent
            loop.call_soon(events.put_nowait, None)
            await publisher

    async def _publish_events(self, topic: str, events: "asyncio.Queue | list[StreamEvent]") -> None:
        """Publish stream events in order, off the decode loop's critical path.

        Token deltas go at QoS 0 (no acknowledgement round trip per token; a
        live TCP session does not lose them), the others at QoS 1. While the
        broker is away events are not published; the history has them, and
        :meth:`_republish_history` (on reconnect) or a :class:`StreamReplay`
        sends them again.
        """
        if isinstance(events, list):
            pending: asyncio.Queue = asyncio.Queue()
            for e in events + [None]:
                pending.put_nowait(e)
            events = pending
        while (event := await events.get()) is not None:
            client = self._mqtt
            if client is None:
                continue
            try:
                await client.publish(topic, event.dump(self.key), qos=0 if event.type == "token" else 1)
            except aiomqtt.MqttError as exc:
                log.warning("could not publish to %s: %s", topic, exc)

    def _republish_history(self) -> None:
        """After a reconnect: publish the kept events again (receivers drop the ones they have)."""
        for request_id, history in list(self._history.items()):
            if history:
                self._spawn(self._publish_events(Topics.stream(request_id), list(history)))

    def _claim(self, job: GenerateJob) -> _Loaded:
        """Check that this agent heads the job's plan and take the job's sequence (a worker thread)."""
        loaded = self._loaded
        if loaded is None or not loaded.is_head or loaded.plan.plan_id != job.plan_id:
            raise HomeringError(f"agent {self.name} is not the head of plan {job.plan_id}")
        if job.seq_id >= loaded.plan.n_parallel:
            raise HomeringError(f"sequence {job.seq_id} does not exist (the plan has {loaded.plan.n_parallel})")
        with loaded.send_lock:
            busy = loaded.active.get(job.seq_id)
            if busy is not None:
                raise HomeringError(f"sequence {job.seq_id} is busy with request {busy}")
            if not loaded.enter():
                raise HomeringError(f"plan {job.plan_id} is being replaced")
            if not loaded.active:  # the head was idle: a new run of work (the telemetry's rate)
                loaded.rate.restart()
            loaded.active[job.seq_id] = job.request_id
        return loaded

    def _generate_sync(self, job: GenerateJob, emit) -> None:
        """The head's generation loop for one request (a worker thread): prefill, then sample and decode.

        Stops at an end-of-generation token, at a stop string (``stop``), at
        ``max_tokens``, at the end of the context, or when the controller
        cancels the request (its client left). When the ring breaks (an agent
        lost, a new plan), it ends the stream with ``interrupted`` and the
        tokens streamed so far.

        A resumed request (``job.resume_token_ids``, the tokens an earlier
        attempt streamed) first replays prompt + those tokens through the ring,
        which rebuilds every window's KV cache, and streams only what follows
        (the approach of Petals' fault-tolerant inference: replay the inputs
        on a new route).
        """
        loaded = self._claim(job)
        window = loaded.windows[-1]
        seq = job.seq_id
        resumed = list(job.resume_token_ids)
        prompt = np.asarray(job.prompt_token_ids + resumed, dtype=np.int32)
        n_ctx = loaded.plan.n_ctx
        request = next(self._request_numbers) & 0xFFFFFFFF
        loaded.queues[request] = queue.Queue()
        loaded.numbers[job.request_id] = request
        sampler = SamplerChain(job.sampling, window.n_vocab)
        sampler.accept(resumed)
        stops = StopMatcher(job.sampling.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for tok in resumed:  # the text the client has: the decoder and stop matcher go on from there
            stops.feed(decoder.decode(window.token_bytes(tok)))
        tokens: list[int] = list(resumed)
        finish = "length"
        t_first = t_end = None
        try:
            if len(prompt) >= n_ctx:
                raise HomeringError(f"the prompt has {len(prompt)} tokens but the context holds {n_ctx}")
            max_new = min(job.sampling.max_tokens - len(resumed), n_ctx - len(prompt))
            t0 = time.perf_counter()
            if max_new > 0 and not stops.stopped:
                self._clear(loaded, request, seq)
                # A resumed request replays with the batch shapes of the original run (the prompt in its
                # micro-batches, then each streamed token alone): other shapes give other floats, and a
                # greedy answer would drift from the fault-free one some tokens later.
                n_prompt = len(job.prompt_token_ids)
                logits = self._forward(loaded, request, seq, prompt[:n_prompt], 0)
                for i, tok in enumerate(resumed):
                    if job.request_id in loaded.interrupted:
                        raise Interrupted("interrupted")
                    logits = self._forward(loaded, request, seq, prompt[n_prompt + i:n_prompt + i + 1],
                                           n_prompt + i)
            for i in range(max_new if not stops.stopped else 0):
                if job.request_id in loaded.interrupted:
                    raise Interrupted("interrupted")
                tok = sampler.sample(logits)
                if t_first is None:
                    t_first = time.perf_counter()
                if window.is_eog(tok) and not job.sampling.ignore_eos:
                    finish = "stop"
                    break
                tokens.append(tok)
                loaded.tokens_generated += 1
                loaded.rate.add()
                text = stops.feed(decoder.decode(window.token_bytes(tok)))
                emit(StreamEvent(request_id=job.request_id, type="token", token_id=tok, text=text))
                if stops.stopped:
                    finish = "stop"
                    break
                if job.request_id in loaded.cancelled:
                    finish = "cancelled"
                    break
                if i + 1 < max_new:
                    logits = self._forward(loaded, request, seq, np.array([tok], dtype=np.int32), len(prompt) + i)
            t_end = time.perf_counter()
        except (Interrupted, OSError) as exc:
            log.info("request %s interrupted after %d token(s): %s", job.request_id, len(tokens), exc)
            emit(StreamEvent(request_id=job.request_id, type="interrupted", token_ids=list(tokens), error=str(exc)))
            return
        finally:
            loaded.queues.pop(request, None)
            loaded.numbers.pop(job.request_id, None)
            if len(loaded.plan.ring) > 1:
                loaded.leave(request)
            loaded.cancelled.discard(job.request_id)
            loaded.interrupted.discard(job.request_id)
            with loaded.send_lock:
                loaded.active.pop(seq, None)
            loaded.exit()
            sampler.close()
        new = len(tokens) - len(resumed)
        steps = max(1, new - 1) if finish == "length" else max(1, new)
        tail = "" if stops.stopped else stops.feed(decoder.decode(b"", final=True)) + stops.flush()
        emit(StreamEvent(
            request_id=job.request_id, type="done", text=tail, token_ids=tokens,
            prompt_token_ids=job.prompt_token_ids, finish_reason=finish,
            ttft_ms=(t_first - t0) * 1000 if t_first and not resumed else None,
            ms_per_token=(t_end - t_first) * 1000 / steps if t_first and t_end else None))


def ring_stall_s(plan: Plan, frames: list[Frame]) -> float:
    """How long the head waits for a frame to come back before it calls the ring broken, seconds.

    The data-plane timeout, the third loss signal besides last wills and
    heartbeats (it catches a ring whose links broke while MQTT still works):
    :data:`RING_STALL_MIN_S` plus :data:`RING_STALL_FACTOR` times the plan's
    predicted time for the work ahead (the frames' tokens, or one token per
    sequence that may share the ring); :data:`RING_TIMEOUT_S` when the plan
    has no prediction.
    """
    if not plan.predicted_ms_per_token:
        return RING_TIMEOUT_S
    tokens = max(sum(f.header.n_tokens for f in frames), plan.n_parallel)
    return RING_STALL_MIN_S + RING_STALL_FACTOR * plan.predicted_ms_per_token / 1000 * tokens


def default_name() -> str:
    """``<hostname>-<pid>``: unique enough on a LAN, readable in tables."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"[:64]

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
import itertools
import logging
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import numpy as np
import psutil

from homering.cluster import mqtt
from homering.cluster.dataplane import Frame, open_link, read_frame, set_nodelay, write_frame
from homering.cluster.schema import (
    AgentProfile, AgentStatus, FrameError, FrameKind, GenerateJob, MalformedMessage, Plan,
    StreamEvent, Topics,
)
from homering.engine.sampling import SamplerChain
from homering.engine.window import DecodeError, LayerWindow
from homering.errors import HomeringError
from homering.models.gguf_info import fingerprint
from homering.models.slicing import Role, WindowSpec, slice_window

log = logging.getLogger("homering.agent")

RING_TIMEOUT_S = 120.0


@dataclass
class _Loaded:
    """What an agent holds for the current plan."""

    plan: Plan
    position: int
    windows: list[LayerWindow]
    successor: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    queues: dict[int, asyncio.Queue] = field(default_factory=dict)  # head: results by request number

    @property
    def is_head(self) -> bool:
        return self.position == len(self.plan.ring) - 1

    def close(self) -> None:
        if self.successor is not None:
            self.successor[1].close()
        for w in self.windows:
            w.close()


class Agent:
    """One ring member.

    Args:
        broker: the MQTT broker.
        name: unique agent name (topic-safe).
        threads: llama.cpp threads per window.
        data_port: TCP port of the data plane (0: any free port).
        host: address neighbours use to reach this agent.
        bind: address the data port listens on.
    """

    def __init__(self, broker: mqtt.BrokerURL, *, name: str, threads: int, data_port: int = 0,
                 host: str = "127.0.0.1", bind: str = "0.0.0.0"):
        self.broker = broker
        self.name = name
        self.threads = threads
        self.data_port = data_port
        self.host = host
        self.bind = bind
        self._loaded: _Loaded | None = None
        self._plan_task: asyncio.Task | None = None
        self._gen_lock = asyncio.Lock()
        self._request_numbers = itertools.count(1)
        self._mqtt: aiomqtt.Client | None = None
        self._tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------ lifecycle
    def profile(self) -> AgentProfile:
        vm = psutil.virtual_memory()
        return AgentProfile(name=self.name, host=self.host, data_port=self.data_port, pid=os.getpid(),
                            os=platform.system().lower(), cpu_count=os.cpu_count() or 1,
                            threads=self.threads, ram_total=vm.total, ram_available=vm.available)

    async def run(self) -> None:
        """Serve until cancelled. Raises HomeringError when the broker is unreachable."""
        server = await asyncio.start_server(self._serve_link, self.bind, self.data_port)
        self.data_port = server.sockets[0].getsockname()[1]
        will = aiomqtt.Will(Topics.status(self.name), AgentStatus(state="offline").dump(), qos=1, retain=True)
        try:
            async with server, mqtt.client(self.broker, identifier=f"homering-agent-{self.name}",
                                           will=will) as client:
                self._mqtt = client
                await client.publish(Topics.profile(self.name), self.profile().dump(), qos=1, retain=True)
                await self._status("online")
                await client.subscribe(Topics.PLAN, qos=1)
                await client.subscribe(Topics.generate(self.name), qos=1)
                log.info("agent %s up: data port %d, broker %s", self.name, self.data_port, self.broker)
                async for message in client.messages:
                    self._dispatch(message)
        except aiomqtt.MqttError as exc:
            raise mqtt.connect_error(self.broker, exc) from None
        finally:
            if self._loaded:
                self._loaded.close()

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
                plan = Plan.load(message.payload)
                if self._plan_task and not self._plan_task.done():
                    self._plan_task.cancel()
                self._plan_task = self._spawn(self._apply_plan(plan))
            elif message.topic.matches(Topics.generate(self.name)):
                job = GenerateJob.load(message.payload)
                self._spawn(self._generate(job))
        except MalformedMessage as exc:
            log.warning("dropped malformed message on %s: %s", topic, exc)

    async def _status(self, state: str, plan_id: str | None = None, detail: str | None = None) -> None:
        if self._mqtt is not None:
            await self._mqtt.publish(Topics.status(self.name),
                                     AgentStatus(state=state, plan_id=plan_id, detail=detail).dump(),
                                     qos=1, retain=True)

    # ------------------------------------------------------------ plans
    async def _apply_plan(self, plan: Plan) -> None:
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        position = plan.position(self.name)
        if position is None:
            await self._status("online", plan.plan_id, "not in the plan")
            return
        await self._status("loading", plan.plan_id)
        try:
            windows = await asyncio.to_thread(self._load_windows, plan, position)
            loaded = _Loaded(plan, position, windows)
            if len(plan.ring) > 1:
                nxt = plan.ring[(position + 1) % len(plan.ring)]
                loaded.successor = await open_link(nxt.host, nxt.data_port)
            self._loaded = loaded
        except (HomeringError, ConnectionError, OSError, ValueError) as exc:
            log.error("cannot load plan %s: %s", plan.plan_id, exc)
            await self._status("error", plan.plan_id, str(exc))
            return
        log.info("plan %s loaded: windows %s, %s", plan.plan_id,
                 [(w.start, w.end) for w in plan.ring[position].windows],
                 "head" if loaded.is_head else f"next {plan.ring[(position + 1) % len(plan.ring)].name}")
        await self._status("ready", plan.plan_id)

    def _load_windows(self, plan: Plan, position: int) -> list[LayerWindow]:
        model_path = plan.model_path
        if not os.path.isfile(model_path):
            raise HomeringError(f"model file {model_path} is not on this device")
        if fingerprint(Path(model_path)) != plan.model_fingerprint:
            raise HomeringError(f"model file {model_path} does not match the plan's model")
        out = []
        for w in plan.ring[position].windows:
            role = Role.for_range(w.start, w.end, plan.n_layers)
            path = slice_window(model_path, WindowSpec(w.start, w.end, role), progress=False,
                                model_fp=plan.model_fingerprint)
            out.append(LayerWindow(path, takes_tokens=role.takes_tokens, gives_logits=role.gives_logits,
                                   n_ctx=plan.n_ctx, n_batch=plan.n_batch, n_threads=self.threads))
        return out

    # ------------------------------------------------------------ data plane
    async def _serve_link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handle frames from the predecessor, in order, until it disconnects."""
        set_nodelay(writer)
        peer = writer.get_extra_info("peername")
        try:
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    break
                await self._handle_frame(frame)
        except (FrameError, asyncio.IncompleteReadError, ConnectionError) as exc:
            log.warning("dropping data link from %s: %s", peer, exc)
        finally:
            writer.close()

    async def _handle_frame(self, frame: Frame) -> None:
        loaded = self._loaded
        h = frame.header
        if loaded is None:
            log.warning("frame for request %d arrived with no plan loaded; dropped", h.request_id)
            return
        out: Frame | None = frame
        if h.kind is FrameKind.FORWARD:
            window = loaded.windows[min(h.round, len(loaded.windows) - 1)]
            try:
                result = await window.aforward(frame.payload, h.pos, h.seq_id)
                out = None if loaded.is_head else Frame.forward(h.request_id, h.seq_id, h.pos, result.hidden,
                                                                h.round)
            except (DecodeError, ValueError) as exc:
                out = Frame.error(h.request_id, h.seq_id, f"{self.name}: {exc}")
        elif h.kind is FrameKind.KV_REMOVE:
            for w in loaded.windows:
                await asyncio.to_thread(w.kv_remove, h.seq_id, h.pos)
        if loaded.is_head:
            queue = loaded.queues.get(h.request_id)
            if queue is not None:
                queue.put_nowait(out if out is not None else frame)
        elif loaded.successor is not None:
            await write_frame(loaded.successor[1], out)

    async def _ring(self, loaded: _Loaded, request: int, frames: list[Frame]) -> None:
        """Send frames into the ring and wait until each came back through the head's window.

        Raises:
            DecodeError: a window on the way failed (the ERROR frame's message).
            TimeoutError: the ring did not answer in time.
        """
        queue = loaded.queues[request]
        for f in frames:
            await write_frame(loaded.successor[1], f)
        for _ in frames:
            back = await asyncio.wait_for(queue.get(), RING_TIMEOUT_S)
            if back.header.kind is FrameKind.ERROR:
                raise DecodeError(back.payload)

    async def _forward(self, loaded: _Loaded, request: int, tokens: np.ndarray, pos: int) -> None:
        """Run ``tokens`` at ``pos`` through every window; the head's context then holds the logits."""
        if len(loaded.plan.ring) == 1:
            await loaded.windows[0].aforward(tokens, pos)
            return
        n_batch = loaded.plan.n_batch
        frames = [Frame.forward(request, 0, pos + i, tokens[i:i + n_batch]) for i in range(0, len(tokens), n_batch)]
        await self._ring(loaded, request, frames)

    async def _clear(self, loaded: _Loaded, request: int) -> None:
        if len(loaded.plan.ring) == 1:
            loaded.windows[0].kv_remove(0, 0)
        else:
            await self._ring(loaded, request, [Frame.kv_remove(request, 0, 0)])

    # ------------------------------------------------------------ generation (head)
    async def _generate(self, job: GenerateJob) -> None:
        stream = Topics.stream(job.request_id)
        events: asyncio.Queue = asyncio.Queue()
        publisher = self._spawn(self._publish_events(stream, events))
        try:
            async with self._gen_lock:
                await self._generate_locked(job, events)
        except (DecodeError, HomeringError, TimeoutError, ConnectionError, ValueError) as exc:
            log.warning("request %s failed: %s", job.request_id, exc)
            events.put_nowait(StreamEvent(request_id=job.request_id, type="error", error=str(exc)))
        finally:
            events.put_nowait(None)
            await publisher

    async def _publish_events(self, topic: str, events: asyncio.Queue) -> None:
        """Publish stream events in order, off the decode loop's critical path."""
        while (event := await events.get()) is not None:
            try:
                await self._mqtt.publish(topic, event.dump(), qos=1)
            except aiomqtt.MqttError as exc:
                log.warning("could not publish to %s: %s", topic, exc)

    async def _generate_locked(self, job: GenerateJob, events: asyncio.Queue) -> None:
        loaded = self._loaded
        if loaded is None or not loaded.is_head or loaded.plan.plan_id != job.plan_id:
            raise HomeringError(f"agent {self.name} is not the head of plan {job.plan_id}")
        window = loaded.windows[-1]
        prompt = np.asarray(job.prompt_token_ids, dtype=np.int32)
        n_ctx = loaded.plan.n_ctx
        if len(prompt) >= n_ctx:
            raise HomeringError(f"the prompt has {len(prompt)} tokens but the context holds {n_ctx}")
        max_new = min(job.sampling.max_tokens, n_ctx - len(prompt))
        request = next(self._request_numbers) & 0xFFFFFFFF
        loaded.queues[request] = asyncio.Queue()
        sampler = SamplerChain(job.sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tokens: list[int] = []
        finish = "length"
        try:
            t0 = time.perf_counter()
            await self._clear(loaded, request)
            await self._forward(loaded, request, prompt, 0)
            t_first = None
            for i in range(max_new):
                tok = window.sample(sampler)
                if t_first is None:
                    t_first = time.perf_counter()
                if window.is_eog(tok):
                    finish = "stop"
                    break
                tokens.append(tok)
                events.put_nowait(StreamEvent(request_id=job.request_id, type="token", token_id=tok,
                                              text=decoder.decode(window.token_bytes(tok))))
                if i + 1 < max_new:
                    await self._forward(loaded, request, np.array([tok], dtype=np.int32), len(prompt) + i)
            t_end = time.perf_counter()
        finally:
            loaded.queues.pop(request, None)
            sampler.close()
        steps = max(1, len(tokens) - 1) if finish == "length" else max(1, len(tokens))
        tail = decoder.decode(b"", final=True)
        events.put_nowait(StreamEvent(
            request_id=job.request_id, type="done", text=tail, token_ids=tokens,
            prompt_token_ids=job.prompt_token_ids, finish_reason=finish,
            ttft_ms=(t_first - t0) * 1000, ms_per_token=(t_end - t_first) * 1000 / steps))


def default_name() -> str:
    """``<hostname>-<pid>``: unique enough on a LAN, readable in tables."""
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}"[:64]

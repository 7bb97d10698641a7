"""The cluster client across a broker loss: it says so at once (waiters and streams raise), reconnects by itself
once the broker is back, and serves requests again. A stand-in controller on its own bus answers the requests
(signed, with a cluster key), so the test needs no model and takes seconds."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path

import pytest

from homering.client.client import ClusterClient, new_request_id
from homering.errors import HomeringError
from homering.tasks import Tasks
from homering.transport.broker import free_port, mosquitto_binary, wait_for_port
from homering.transport.bus import Bus, Received
from homering.transport.mqtt import BrokerURL
from homering.wire import (
    Codec,
    ControllerState,
    ControllerStatus,
    EventType,
    GenerateRequest,
    Plan,
    PlanAgent,
    Sampling,
    StreamEvent,
    Topics,
    WindowAssignment,
)
from homering.wire.security import ClusterKey, generate_secret

PLAN = Plan(
    plan_id="p1",
    model_path="fake.gguf",
    model_fingerprint="0" * 16,
    n_layers=2,
    n_ctx=64,
    planner="test",
    ring=[PlanAgent(name="head", host="127.0.0.1", data_port=9, windows=[WindowAssignment(start=0, end=2)])],
)
HANG = "hang"
"""A prompt the stand-in controller never answers."""


class Broker:
    """mosquitto on one loopback port that can be killed and started again on the same port."""

    def __init__(self, folder: Path) -> None:
        exe = mosquitto_binary()
        if exe is None:
            pytest.fail("mosquitto is not installed: run 'make test' (it installs it)")
        self.exe, self.folder, self.port = exe, folder, free_port()
        self.url = BrokerURL("127.0.0.1", self.port)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        conf = self.folder / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        with open(self.folder / "mosquitto.log", "a") as log:
            self.proc = subprocess.Popen([self.exe, "-c", str(conf)], stdout=log, stderr=log)
        if not wait_for_port("127.0.0.1", self.port):
            pytest.fail(f"mosquitto did not start: {(self.folder / 'mosquitto.log').read_text()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class StandInController:
    """Publishes a ready status and :data:`PLAN` (again on every connection, as the controller does) and answers
    every request but :data:`HANG` with two tokens, ``hel`` and ``lo``, then ``done``."""

    def __init__(self, broker: BrokerURL, key: ClusterKey) -> None:
        self.bus = Bus(broker, Codec(key), identifier="stand-in-controller")
        self.bus.route(Topics.REQUESTS, GenerateRequest, self._request)
        self.bus.on_connect(self._announce)
        self.tasks = Tasks("the stand-in controller")

    async def _announce(self, _reconnected: bool) -> None:
        status = ControllerStatus(state=ControllerState.READY, model="fake", plan_id=PLAN.plan_id, n_ctx=64)
        await self.bus.publish(Topics.CONTROLLER, status, retain=True)
        await self.bus.publish(Topics.PLAN, PLAN, retain=True)

    def _request(self, r: Received) -> None:
        req: GenerateRequest = r.message
        if req.prompt != HANG:
            self.tasks.spawn(self._answer(req.request_id))

    async def _answer(self, rid: str) -> None:
        events = [
            StreamEvent(request_id=rid, type=EventType.TOKEN, index=0, text="hel", token_id=1),
            StreamEvent(request_id=rid, type=EventType.TOKEN, index=1, text="lo", token_id=2),
            StreamEvent(
                request_id=rid,
                type=EventType.DONE,
                index=2,
                token_ids=[1, 2],
                prompt_token_ids=[7],
                finish_reason="stop",
            ),
        ]
        for ev in events:
            await self.bus.publish(Topics.stream(rid), ev, qos=1, wait=False)


def _request(prompt: str = "hi") -> GenerateRequest:
    return GenerateRequest(request_id=new_request_id(), prompt=prompt, sampling=Sampling(max_tokens=2))


async def _answer(client: ClusterClient, prompt: str = "hi") -> str:
    return "".join([ev.text async for ev in client.generate(_request(prompt), timeout=30)])


async def _until(predicate, what: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s")
        await asyncio.sleep(0.05)


def test_the_client_reports_a_broker_loss_at_once_reconnects_and_generates_again(tmp_path):
    broker = Broker(tmp_path)
    secret = generate_secret()

    async def go() -> None:
        controller = StandInController(broker.url, ClusterKey(secret, source="the test"))
        running = asyncio.create_task(controller.bus.run())
        async with ClusterClient(broker.url, key=ClusterKey(secret, source="the test")) as client:
            await client.wait_ready(30)
            assert client.lost is None
            assert await _answer(client) == "hello"
            hanging = asyncio.create_task(_answer(client, HANG))
            await asyncio.sleep(0.5)  # the request is out; no answer comes
            broker.kill()
            with pytest.raises(HomeringError, match="lost the connection to the MQTT broker"):
                await asyncio.wait_for(hanging, 5)  # the stream in flight raises at once, not after its timeout
            assert client.lost and str(broker.url) in client.lost
            with pytest.raises(HomeringError, match="lost the connection to the MQTT broker"):
                await asyncio.wait_for(client.wait_ready(60), 5)
            with pytest.raises(HomeringError, match="lost the connection to the MQTT broker"):
                await asyncio.wait_for(_answer(client), 5)
            assert await client.cancel("any") is False
            await asyncio.sleep(1.0)  # the broker stays away for a while: the client keeps trying
            await asyncio.to_thread(broker.start)
            await _until(lambda: client.lost is None, "reconnection", 30)
            await client.wait_ready(30)
            assert await _answer(client) == "hello"
            assert await client.cancel("any") is True
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running

    broker.start()
    try:
        asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        broker.kill()

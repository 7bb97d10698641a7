"""An agent in process on a mosquitto of its own, driven over MQTT as the controller drives it: what it
answers when profiling or a link probe fails in a way nobody planned for."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiomqtt
import pytest

from homering.agent.agent import Agent
from homering.models.gguf_info import fingerprint
from homering.wire import AgentState, AgentStatus, ControllerState, ControllerStatus, LinkProbe, LinkReport, Topics
from tests.conftest import run_mosquitto

NAME = "probed"


@contextlib.asynccontextmanager
async def running_agent(broker, *topics: str):
    """An agent on ``broker``, and a client subscribed to ``topics`` before the agent starts (the queue of
    (topic, payload) it receives)."""
    received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    async with aiomqtt.Client(broker.host, broker.port) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)

        async def read():
            async for m in client.messages:
                received.put_nowait((m.topic.value, bytes(m.payload)))

        reader = asyncio.create_task(read())
        agent = Agent(broker, name=NAME, threads=1)
        run = asyncio.create_task(agent.run())
        try:
            yield client, received
        finally:
            run.cancel()
            reader.cancel()
            await asyncio.gather(run, reader, return_exceptions=True)


async def next_message(received, topic: str, cls, where=lambda m: True, timeout: float = 30.0):
    """The next message of class ``cls`` on ``topic`` for which ``where`` holds."""

    async def find():
        while True:
            got_topic, payload = await received.get()
            if got_topic == topic and payload:
                msg = cls.load(payload, key=None)
                if where(msg):
                    return msg

    return await asyncio.wait_for(find(), timeout)


def test_a_profile_that_fails_unexpectedly_is_reported_and_tried_again(smollm2, tmp_path, monkeypatch, caplog):
    """Profiling that fails with an error nobody planned for (here an OSError: the agent's home folder
    cannot be created) ends with an ``error`` status that says so, and the next controller status asks
    again. It used to leave the agent silent, and never profiling again."""
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    monkeypatch.setenv("HOMERING_HOME", str(home))
    status = ControllerStatus(
        state=ControllerState.WAITING, model="smollm2", model_path=str(smollm2), model_fingerprint=fingerprint(smollm2)
    )

    async def go():
        async with running_agent(broker, Topics.status(NAME)) as (client, received):
            await next_message(received, Topics.status(NAME), AgentStatus, lambda s: s.state == AgentState.ONLINE)
            errors = []
            for _ in range(2):  # not retained: a status only this agent hears
                await client.publish(Topics.CONTROLLER, status.dump(None), qos=1)
                errors.append(
                    await next_message(
                        received, Topics.status(NAME), AgentStatus, lambda s: s.state == AgentState.ERROR
                    )
                )
            return errors

    with run_mosquitto(tmp_path) as broker, caplog.at_level(logging.ERROR, logger="homering.agent"):
        errors = asyncio.run(go())
    assert all(e.detail.startswith("cannot profile: ") and "File exists" in e.detail for e in errors), errors
    assert "cannot profile this device" in caplog.text


@pytest.mark.parametrize("host", ["a" * 300, "no-such-host.invalid"])
def test_a_link_probe_always_gets_a_report(host, tmp_path):
    """A probe of a host name that cannot even be encoded (an IDNA label over 63 bytes) is answered with an
    error report, as one of an unknown host is: the probe task used to die silently, and the controller
    waited for the report until its timeout."""
    probe = LinkProbe(probe_id="probe-1", host=host, port=9)

    async def go():
        result = Topics.probe_result(NAME)
        async with running_agent(broker, Topics.status(NAME), result) as (client, received):
            await next_message(received, Topics.status(NAME), AgentStatus, lambda s: s.state == AgentState.ONLINE)
            await client.publish(Topics.probe(NAME), probe.dump(None), qos=1)
            return await next_message(received, result, LinkReport, timeout=60)

    with run_mosquitto(tmp_path) as broker:
        report = asyncio.run(go())
    assert report.probe_id == "probe-1" and "cannot reach data port" in report.error

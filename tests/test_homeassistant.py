"""Home Assistant MQTT discovery: retained configs on a real mosquitto, templates rendered with jinja2."""

from __future__ import annotations

import asyncio
import json
import re

import jinja2
import pytest

from homering.integrations.homeassistant import (
    CONTROLLER_NODE,
    DISCOVERY_PREFIX,
    agent_configs,
    agent_node_id,
    clear_discovery,
    controller_configs,
    publish_discovery,
)
from homering.transport import mqtt
from homering.wire import (
    AgentStats,
    AgentStatus,
    ControllerStats,
    ControllerStatus,
    Topics,
)

AGENT = "desk-1.lan"
TEST_PREFIX = "homering-test-ha"
TOPIC = re.compile(r"^homeassistant/sensor/[A-Za-z0-9_-]+/[A-Za-z0-9_-]+/config$")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def all_configs() -> list[tuple[str, dict]]:
    return agent_configs(AGENT) + controller_configs()


async def retained(broker, *, expect: int, quiet: float = 0.5, prefix: str = DISCOVERY_PREFIX) -> dict[str, bytes]:
    """Retained messages under the discovery prefix that a new subscriber receives.

    Waits for ``expect`` messages, then for ``quiet`` seconds of silence (to catch extra ones).
    """
    got: dict[str, bytes] = {}
    async with mqtt.client(broker, identifier="ha-test-reader") as reader:
        await reader.subscribe(f"{prefix}/#", qos=1)
        messages = aiter(reader.messages)
        while True:
            try:
                timeout = quiet if len(got) >= expect else 10
                message = await asyncio.wait_for(anext(messages), timeout)
            except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
                return got
            assert message.retain, f"{message.topic} was not retained"
            got[str(message.topic)] = bytes(message.payload)


def test_discovery_configs_are_retained_and_cleared(mosquitto):
    # under a prefix of this test's own: the session's broker also holds the API tests' cluster's configs
    configs = agent_configs(AGENT, prefix=TEST_PREFIX) + controller_configs(prefix=TEST_PREFIX)

    async def go():
        async with mqtt.client(mosquitto, identifier="ha-test-writer") as writer:
            await publish_discovery(writer, configs)
        published = await retained(mosquitto, expect=len(configs), prefix=TEST_PREFIX)
        async with mqtt.client(mosquitto, identifier="ha-test-cleaner") as cleaner:
            await clear_discovery(cleaner, configs)
        after = await retained(mosquitto, expect=0, prefix=TEST_PREFIX)
        return published, after

    published, after = run(go())
    assert sorted(published) == sorted(topic for topic, _ in configs)
    unique_ids = []
    for topic, raw in published.items():
        assert TOPIC.match(topic.replace(TEST_PREFIX, DISCOVERY_PREFIX, 1)), topic
        payload = json.loads(raw)
        for key in ("name", "state_topic", "unique_id", "device"):
            assert payload.get(key), f"{topic} lacks {key}"
        assert payload["device"]["identifiers"]
        unique_ids.append(payload["unique_id"])
    assert len(set(unique_ids)) == len(unique_ids) == 8
    devices = {json.loads(raw)["device"]["identifiers"][0] for raw in published.values()}
    assert devices == {f"homering_agent_{AGENT}", "homering_controller"}
    assert after == {}


def test_agent_names_are_encoded_in_topics_only_and_one_per_name():
    topics = [topic for topic, _ in agent_configs("a.b_c-d")]
    assert all(TOPIC.match(topic) for topic in topics)
    assert all(topic.startswith("homeassistant/sensor/homering__612e625f632d64/") for topic in topics)
    nodes = {name: agent_node_id(name) for name in ("a.b", "a_b", "_a", "controller", "612e62")}
    assert len(set(nodes.values())) == len(nodes)  # a.b and a_b used to share their sensors
    assert nodes["a_b"] == "homering_a_b"  # plain names as they are: broker ACLs can name them
    assert CONTROLLER_NODE not in nodes.values()
    assert all(CONTROLLER_NODE not in t for name in nodes for t, _ in agent_configs(name))
    assert {p["unique_id"] for _, p in agent_configs("a.b_c-d")} == {
        "homering_a.b_c-d_status",
        "homering_a.b_c-d_tokens_per_s",
        "homering_a.b_c-d_memory_used",
        "homering_a.b_c-d_layers",
    }
    assert agent_configs("x", prefix="ha")[0][0] == "ha/sensor/homering_x/status/config"
    with pytest.raises(ValueError):
        agent_configs("bad/name")


SAMPLES = {
    Topics.status(AGENT): AgentStatus(state="ready"),
    Topics.stats(AGENT): AgentStats(name=AGENT, layers=10, tokens_per_s=12.5, rss_bytes=123),
    Topics.CONTROLLER: ControllerStatus(state="ready", model="m.gguf"),
    Topics.CONTROLLER_STATS: ControllerStats(requests_in_flight=2, queue_depth=1),
}

EXPECTED = {  # unique_id -> the field the sensor must show
    "homering_desk-1.lan_status": "ready",
    "homering_desk-1.lan_tokens_per_s": 12.5,
    "homering_desk-1.lan_memory_used": 123,
    "homering_desk-1.lan_layers": 10,
    "homering_controller_state": "ready",
    "homering_controller_model": "m.gguf",
    "homering_controller_requests_in_flight": 2,
    "homering_controller_queue_depth": 1,
}


def render(template: str, message) -> str:
    """Render a Home Assistant value template as HA does for a JSON payload (``value_json``)."""
    return jinja2.Environment().from_string(template).render(value_json=json.loads(message.dump()))


def test_value_templates_extract_the_fields():
    configs = all_configs()
    assert {p["unique_id"] for _, p in configs} == set(EXPECTED)
    for _, payload in configs:
        sample = SAMPLES[payload["state_topic"]]
        assert render(payload["value_template"], sample) == str(EXPECTED[payload["unique_id"]]), payload["name"]


@pytest.mark.parametrize("state", ["online", "loading", "ready", "error", "offline"])
def test_agent_availability_follows_the_status(state):
    for _, payload in agent_configs(AGENT):
        [availability] = payload["availability"]
        assert availability["topic"] == Topics.status(AGENT)
        rendered = render(availability["value_template"], AgentStatus(state=state))
        assert rendered == ("offline" if state == "offline" else "online")
        assert rendered == availability["payload_not_available" if state == "offline" else "payload_available"]


@pytest.mark.parametrize("state", ["waiting", "planning", "ready", "error", "offline"])
def test_controller_availability_follows_the_status(state):
    for _, payload in controller_configs():
        [availability] = payload["availability"]
        assert availability["topic"] == Topics.CONTROLLER
        rendered = render(availability["value_template"], ControllerStatus(state=state))
        assert rendered == ("offline" if state == "offline" else "online")


def test_an_agent_that_leaves_for_good_disappears_from_home_assistant(mosquitto, tmp_path):
    """`homering agent --ha-discovery` publishes its sensors; stopped (SIGTERM, leaving for good), it removes
    them, so Home Assistant's retained discovery topics no longer name it."""
    import os
    import subprocess
    import sys

    from homering.client.local import stop_processes

    name = f"ha-leaver-{os.getpid()}"
    node = agent_node_id(name)
    with open(tmp_path / "agent.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "homering",
                "agent",
                "--broker",
                str(mosquitto),
                "--name",
                name,
                "--threads",
                "1",
                "--ha-discovery",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        try:

            async def configs(expect: int) -> dict[str, bytes]:
                """The agent's retained, non-empty discovery configs a new subscriber gets."""
                got: dict[str, bytes] = {}
                async with mqtt.client(mosquitto) as reader:
                    await reader.subscribe(f"{DISCOVERY_PREFIX}/sensor/{node}/#", qos=1)
                    try:
                        async with asyncio.timeout(1.5):
                            async for m in reader.messages:
                                if m.retain and m.payload:
                                    got[str(m.topic)] = bytes(m.payload)
                    except TimeoutError:
                        pass
                return got

            for _ in range(60):  # it publishes them once connected
                present = run(configs(4))
                if len(present) == 4:
                    break
            assert len(present) == 4, present
        finally:
            stop_processes([proc], 10)
    assert proc.returncode is not None
    assert run(configs(0)) == {}
    assert "Traceback" not in (tmp_path / "agent.log").read_text()

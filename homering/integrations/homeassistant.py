"""Home Assistant MQTT discovery: the cluster's agents and controller as Home Assistant devices.

Home Assistant's MQTT integration subscribes to ``<discovery_prefix>/#`` (``homeassistant`` by
default) and, for every retained JSON message on a topic of the form::

    <discovery_prefix>/<component>/[<node_id>/]<object_id>/config

creates an entity of that ``component`` (here always ``sensor``) that reads its value from the
payload's ``state_topic`` through ``value_template``. Entities whose payload carries a ``unique_id``
and a ``device`` (with ``identifiers``) are grouped into one device in HA's device registry, and
``availability`` marks them unavailable while the availability template renders
``payload_not_available``. An empty retained message on the same ``config`` topic removes the
entity. ``node_id`` and ``object_id`` may only contain ``[a-zA-Z0-9_-]``.

Source: Home Assistant's MQTT discovery documentation
(https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery) and the MQTT sensor page
(https://www.home-assistant.io/integrations/sensor.mqtt/).

No new topics are needed: the sensors read the retained messages the cluster publishes anyway
(:class:`~homering.wire.AgentStatus`, :class:`~homering.wire.AgentStats`,
:class:`~homering.wire.ControllerStatus`, :class:`~homering.wire.ControllerStats`),
and availability follows their ``state`` field, which each last will sets to ``offline``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

import aiomqtt

from homering.wire import NAME, Topics

DISCOVERY_PREFIX = "homeassistant"

COMPONENT = "sensor"

_ORIGIN = {"name": "homering"}

AVAILABILITY_TEMPLATE = "{{ 'offline' if value_json.state == 'offline' else 'online' }}"
"""Renders ``offline`` when the status message's ``state`` is ``offline`` and ``online`` otherwise."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_PLAIN = re.compile(r"[A-Za-z0-9-][A-Za-z0-9_-]*")

CONTROLLER_NODE = "homering__controller"
"""The controller's ``node_id``: no agent's can be it (see :func:`agent_node_id`)."""


def _topic_id(text: str) -> str:
    """``text`` usable as a discovery ``object_id`` (only ``[a-zA-Z0-9_-]``)."""
    return _UNSAFE.sub("_", text)


def agent_node_id(name: str) -> str:
    """Agent ``name``'s discovery ``node_id``, one per name: ``homering_<name>``, or ``homering__<hex>``.

    A name of letters, digits, ``-`` and ``_`` that does not start with ``_`` is kept as it is
    (so a broker ACL can grant the user ``NAME`` the topics ``homeassistant/sensor/homering_NAME/#``);
    any other name (``a.b``) is written as ``_`` and its UTF-8 in hex (``homering__612e62``), which
    no kept name can be, so ``a.b`` and ``a_b`` never share topics. Nor can an agent take the
    controller's (:data:`CONTROLLER_NODE`: ``_controller`` is no hex).
    """
    return f"homering_{name if _PLAIN.fullmatch(name) else '_' + name.encode().hex()}"


def _availability(topic: str) -> list[dict]:
    return [
        {
            "topic": topic,
            "value_template": AVAILABILITY_TEMPLATE,
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]


def _sensor(
    prefix: str,
    node_id: str,
    key: str,
    unique_id: str,
    device: dict,
    availability: list[dict],
    *,
    name: str,
    state_topic: str,
    field: str,
    **extra,
) -> tuple[str, dict]:
    """One sensor's discovery ``(topic, payload)``; ``field`` is read from the state message's JSON."""
    payload = {
        "name": name,
        "unique_id": unique_id,
        "state_topic": state_topic,
        "value_template": f"{{{{ value_json.{field} }}}}",
        "device": device,
        "availability": availability,
        "origin": _ORIGIN,
        **extra,
    }
    return f"{prefix}/{COMPONENT}/{node_id}/{_topic_id(key)}/config", payload


def agent_configs(name: str, *, prefix: str = DISCOVERY_PREFIX) -> list[tuple[str, dict]]:
    """Discovery ``(topic, payload)`` pairs that make agent ``name`` a Home Assistant device.

    The device (identifiers ``homering_agent_<name>``) gets four sensors: its status
    (:class:`~homering.wire.AgentStatus` ``state``), tokens/s, resident memory and
    layers held (from :class:`~homering.wire.AgentStats`). All are unavailable while the
    agent's status is ``offline``. Publish them retained with :func:`publish_discovery`.

    The topic's ``node_id`` is :func:`agent_node_id`'s (one per name); ``unique_id`` keeps the name
    as is. :func:`clear_discovery` removes them again when the agent leaves for good.

    Raises:
        ValueError: ``name`` is not a valid agent name.
    """
    if not re.fullmatch(NAME, name):
        raise ValueError(f"invalid agent name {name!r}")
    node_id = agent_node_id(name)
    device = {
        "identifiers": [f"homering_agent_{name}"],
        "name": f"homering agent {name}",
        "manufacturer": "homering",
        "model": "agent",
    }
    availability = _availability(Topics.status(name))
    status, stats = Topics.status(name), Topics.stats(name)

    def sensor(key: str, **kw) -> tuple[str, dict]:
        return _sensor(prefix, node_id, key, f"homering_{name}_{key}", device, availability, **kw)

    return [
        sensor("status", name="Status", state_topic=status, field="state", icon="mdi:state-machine"),
        sensor(
            "tokens_per_s",
            name="Tokens/s",
            state_topic=stats,
            field="tokens_per_s",
            unit_of_measurement="tokens/s",
            state_class="measurement",
            icon="mdi:speedometer",
        ),
        sensor(
            "memory_used",
            name="Memory used",
            state_topic=stats,
            field="rss_bytes",
            device_class="data_size",
            unit_of_measurement="B",
            state_class="measurement",
        ),
        sensor(
            "layers",
            name="Layers held",
            state_topic=stats,
            field="layers",
            state_class="measurement",
            icon="mdi:layers",
        ),
    ]


def controller_configs(*, prefix: str = DISCOVERY_PREFIX) -> list[tuple[str, dict]]:
    """Discovery ``(topic, payload)`` pairs that make the controller a Home Assistant device.

    The device (identifiers ``homering_controller``) gets four sensors: its state and current
    model (from :class:`~homering.wire.ControllerStatus`), requests in flight and queue
    depth (from :class:`~homering.wire.ControllerStats`). All are unavailable while the
    controller's status is ``offline``. Publish them retained with :func:`publish_discovery`.
    """
    node_id = CONTROLLER_NODE
    device = {
        "identifiers": ["homering_controller"],
        "name": "homering controller",
        "manufacturer": "homering",
        "model": "controller",
    }
    availability = _availability(Topics.CONTROLLER)

    def sensor(key: str, **kw) -> tuple[str, dict]:
        return _sensor(prefix, node_id, key, f"homering_controller_{key}", device, availability, **kw)

    return [
        sensor("state", name="State", state_topic=Topics.CONTROLLER, field="state", icon="mdi:state-machine"),
        sensor("model", name="Current model", state_topic=Topics.CONTROLLER, field="model", icon="mdi:brain"),
        sensor(
            "requests_in_flight",
            name="Requests in flight",
            state_topic=Topics.CONTROLLER_STATS,
            field="requests_in_flight",
            state_class="measurement",
            icon="mdi:progress-clock",
        ),
        sensor(
            "queue_depth",
            name="Queue depth",
            state_topic=Topics.CONTROLLER_STATS,
            field="queue_depth",
            state_class="measurement",
            icon="mdi:tray-full",
        ),
    ]


async def publish_discovery(client: aiomqtt.Client, configs: Iterable[tuple[str, dict]]) -> None:
    """Publish discovery configs (JSON, QoS 1, retained): Home Assistant creates or updates the
    entities now, and again from the retained copies whenever it restarts or reconnects."""
    for topic, payload in configs:
        await client.publish(topic, json.dumps(payload), qos=1, retain=True)


async def clear_discovery(client: aiomqtt.Client, configs: Iterable[tuple[str, dict]]) -> None:
    """Remove the entities of ``configs`` from Home Assistant: an empty retained message on each
    config topic deletes the entity (and the device once it has none left) and clears the
    broker's retained copy."""
    for topic, _payload in configs:
        await client.publish(topic, b"", qos=1, retain=True)

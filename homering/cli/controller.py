"""``homering controller`` (plans the cluster and serves requests) and the hidden ``homering broker``."""

from __future__ import annotations

import contextlib
import os

import click

from homering.cli.drafting import draft_options
from homering.cli.options import (
    HA_OPTION,
    KEY_OPTION,
    MODEL_OPTION,
    api_key_option,
    broker_options,
    cluster_key,
    given,
    serving_options,
)
from homering.cli.running import run

CONTROLLER_NICE = 10
"""The controller's niceness (``os.nice``): it follows every token's stream event (about 0.9 ms of CPU per
token, measured on a 2-core host), and on a machine that also runs agents, as ``homering up`` does, that
work came at token boundaries, when the next agent starts computing: its link thread waited 1.6 ms per token
for a core. The ring's compute now wins; the controller's work waits a little."""


def yield_cpu_to_the_ring() -> None:
    """Lower this process's CPU priority by :data:`CONTROLLER_NICE` (nothing where ``os.nice`` is missing)."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(CONTROLLER_NICE)


@click.command()
@broker_options()
@MODEL_OPTION
@click.option(
    "--agents",
    "-n",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Agents to wait for before planning.",
)
@click.option(
    "--ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True, help="Context size in tokens."
)
@click.option(
    "--timeout",
    type=click.FloatRange(1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for the agents to join.",
)
@serving_options
@click.option(
    "--api-host",
    default="127.0.0.1",
    show_default=True,
    help="Address of the OpenAI-compatible API (0.0.0.0 to serve the LAN).",
)
@click.option(
    "--api-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve the OpenAI-compatible API on this port [default: no API].",
)
@api_key_option
@HA_OPTION
@KEY_OPTION
@draft_options
def controller(
    broker,
    model,
    agents,
    ctx,
    timeout,
    serving,
    api_host,
    api_port,
    api_key_file,
    ha_discovery,
    key_file,
    draft,
) -> None:
    """Coordinate the cluster: wait for agents, plan, and serve generation requests.

    With --api-port it also serves the OpenAI API (/v1/chat/completions,
    /v1/completions, /v1/models, /v1/cluster, /health, /metrics), the Ollama
    API (/api/*), the Anthropic Messages API (/v1/messages) and a web UI at /.
    """
    from homering.controller.controller import DEFAULT_BATCH, Controller
    from homering.models.registry import resolve_model
    from homering.secrets import api_key

    if api_key_file and api_port is None and given("api_key_file"):
        raise click.UsageError("--api-key-file goes with --api-port")
    key = api_key(api_key_file) if api_port else None
    path = resolve_model(model)
    draft_model = draft.check(path, n_ctx=ctx, n_parallel=serving.parallel, memory=False)
    yield_cpu_to_the_ring()
    run(
        Controller(
            broker,
            path,
            n_agents=agents,
            n_ctx=ctx,
            join_timeout=timeout,
            planner=serving.planner,
            rounds=serving.rounds,
            n_batch=serving.n_batch or DEFAULT_BATCH,
            n_parallel=serving.parallel,
            max_queue=serving.max_queue,
            api=(api_host, api_port) if api_port else None,
            api_key=key,
            ha_discovery=ha_discovery,
            key=cluster_key(key_file),
            speculative=draft.speculative(draft_model),
        ).run()
    )


@click.command(hidden=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=1883, show_default=True)
def broker(host, port) -> None:
    """Run the embedded (amqtt) MQTT broker: only the user and password in $HOMERING_MQTT_USER and
    $HOMERING_MQTT_PASSWORD may connect when they are set, anyone otherwise."""
    from homering.transport.broker import run_broker
    from homering.transport.mqtt import BrokerAuth

    auth = BrokerAuth.load()
    run(run_broker(host, port, auth if auth.username else None))

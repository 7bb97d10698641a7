"""``homering agent``: one device of the cluster."""

from __future__ import annotations

import os
from pathlib import Path

import click

from homering.cli.drafting import draft_options
from homering.cli.options import KEY_OPTION, broker_options, cluster_key
from homering.cli.running import run


@click.command()
@broker_options()
@click.option(
    "--name",
    default=None,
    help="Agent name, unique in the cluster [default: HOST-PID]. With an ACL "
    "like docker/mosquitto/acl it must equal the MQTT --user.",
)
@click.option(
    "--threads", "-t", type=click.IntRange(1, 512), default=None, help="llama.cpp threads [default: all cores]."
)
@click.option(
    "--data-port", type=click.IntRange(0, 65535), default=0, help="TCP port of the data plane [default: any free port]."
)
@click.option(
    "--host",
    default=None,
    help="Address ring neighbours use to reach this agent [default: 127.0.0.1 "
    "for a loopback broker, else this machine's address towards the broker].",
)
@click.option(
    "--release/--no-release",
    default=None,
    help="Drop each layer window from the page cache right after using it (with k > 1 rounds), so "
    "the kernel keeps the next one [default: as the plan says: on when this device streams its "
    "windows from disk, and an overflowing device streams the layers it cannot keep]. "
    "--no-release leaves everything to the kernel's page cache.",
)
@click.option(
    "--ha-discovery",
    is_flag=True,
    help="Announce this agent to Home Assistant (MQTT discovery): status, tokens/s, memory, layers.",
)
@KEY_OPTION
@click.option(
    "--model",
    "model_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="This device's copy of the controller's model, when it is not at the controller's path: the "
    "agent slices its windows from it [default: the controller's path, if that file is here; "
    "otherwise the windows are downloaded from the controller].",
)
@click.option(
    "--no-local-model",
    is_flag=True,
    help="Never read a model file here: download the windows (and the profiling probes) from the "
    "controller's API, even when the model is at the controller's path.",
)
@click.option(
    "--api-key-file",
    default=None,
    metavar="PATH",
    envvar="HOMERING_API_KEY_FILE",
    show_envvar=True,
    help="The controller's API key, for downloading windows: this file's first line; or set the key "
    "itself in $HOMERING_API_KEY.",
)
@click.option(
    "--controller-url",
    default=None,
    metavar="URL",
    envvar="HOMERING_CONTROLLER_URL",
    show_envvar=True,
    help="The controller's API base URL for downloads, e.g. http://homeserver:8000/v1 [default: the "
    "URL it announces; a loopback one is taken to be on the broker's host].",
)
@draft_options
def agent(
    broker,
    name,
    threads,
    data_port,
    host,
    release,
    ha_discovery,
    key_file,
    model_file,
    no_local_model,
    api_key_file,
    controller_url,
    draft,
) -> None:
    """Join the cluster as one device: load the planned layer windows, serve the ring.

    The windows come from the model file when this device has it, else from the
    controller (its --api-port), checked against the plan's SHA-256 and cached by hash.
    """
    from homering.agent.agent import Agent, default_name
    from homering.agent.speculative import Drafters
    from homering.engine.pages import limit_malloc_arenas
    from homering.secrets import api_key

    if model_file is not None and no_local_model:
        raise click.UsageError("--model and --no-local-model exclude each other")
    draft_model = draft.check(None, n_ctx=0, n_parallel=1)  # the plan's model and context come later
    limit_malloc_arenas()  # before any thread: fewer arenas, less anonymous memory held
    run(
        Agent(
            broker,
            name=name or default_name(),
            threads=threads or os.cpu_count() or 1,
            data_port=data_port,
            host=host or _local_address(broker.host),
            release=release,
            ha_discovery=ha_discovery,
            key=cluster_key(key_file),
            model=model_file,
            local_model=not no_local_model,
            api_key=api_key(api_key_file),
            controller_url=controller_url,
            drafters=Drafters(draft.speculative(draft_model), draft_model, threads or os.cpu_count() or 1),
        ).run()
    )


def _local_address(broker_host: str) -> str:
    """The address of this machine on the route to the broker."""
    import socket

    if broker_host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((broker_host, 9))  # no packet is sent for UDP connect
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())

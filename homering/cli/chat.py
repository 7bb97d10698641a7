"""``homering chat``: the terminal chat with a running cluster."""

from __future__ import annotations

import click

from homering.cli.options import KEY_OPTION, broker_options, cluster_key, sampling_options
from homering.cli.running import run


@click.command()
@broker_options()
@sampling_options
@click.option("--system", default=None, help="A system message for the conversation.")
@KEY_OPTION
def chat(broker, sampling, system, key_file) -> None:
    """Chat with the cluster in the terminal (/plan, /reset, /quit)."""
    from homering.client.chat import chat as chat_loop

    run(chat_loop(broker, sampling=sampling, system=system, key=cluster_key(key_file)))

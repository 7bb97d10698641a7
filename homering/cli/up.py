"""``homering up``: a whole cluster on this machine (broker, controller, agents), then a chat or one answer."""

from __future__ import annotations

import functools
import signal
import sys
from dataclasses import dataclass

import click

from homering.cli.drafting import DraftSettings, draft_options
from homering.cli.options import (
    HA_OPTION,
    KEY_OPTION,
    MODEL_OPTION,
    ServingSettings,
    api_key_option,
    broker_options,
    child_log_args,
    cluster_key,
    given,
    sampling_options,
    serving_options,
)
from homering.cli.running import run, watch


@dataclass(frozen=True)
class Session:
    """What ``up`` does once the cluster runs (from :func:`session_options`): answer ``prompt`` (as is with
    ``raw``, as one JSON object with ``as_json``), serve the API on 127.0.0.1:``api_port`` headless (not
    ``with_chat``), or chat."""

    prompt: str | None
    raw: bool
    as_json: bool
    api_port: int | None
    with_chat: bool

    def check(self, api_key_file: str | None) -> None:
        """Raise click.UsageError for options that make no sense together."""
        if (self.raw or self.as_json) and self.prompt is None:
            raise click.UsageError("--raw and --json go with --prompt")
        if not self.with_chat and self.api_port is None:
            raise click.UsageError("--no-chat needs --api-port (otherwise nothing could talk to the cluster)")
        if api_key_file and self.api_port is None and given("api_key_file"):
            raise click.UsageError("--api-key-file goes with --api-port")

    def serve(self, cluster, *, sampling, key) -> None:
        """Answer the prompt, serve the API headless or chat, until done; a broker or controller that exits
        (e.g. the API port is taken) ends everything at once."""
        from homering.client.chat import chat as chat_loop
        from homering.client.chat import headless, one_shot

        if self.prompt is not None:
            answer = one_shot(
                cluster.broker, self.prompt, raw=self.raw, sampling=sampling, as_json=self.as_json, key=key
            )
            run(watch(answer, cluster.check))
        elif not self.with_chat:
            run(watch(headless(cluster, f"http://127.0.0.1:{self.api_port}/v1"), cluster.check))
        else:
            run(watch(chat_loop(cluster.broker, sampling=sampling, key=key), cluster.check))


SESSION_OPTIONS = [
    click.option("--prompt", "-p", default=None, help="Answer this one prompt and exit (no chat)."),
    click.option("--raw", is_flag=True, help="With --prompt: send the text as is, without the chat template."),
    click.option("--json", "as_json", is_flag=True, help="With --prompt: print one JSON object."),
    click.option(
        "--api-port",
        type=click.IntRange(1, 65535),
        default=None,
        help="Serve the OpenAI-compatible API on 127.0.0.1:PORT.",
    ),
    click.option(
        "--chat/--no-chat", "with_chat", default=True, help="--no-chat (with --api-port): run headless until Ctrl-C."
    ),
]


def session_options(fn):
    """``--prompt``, ``--raw``, ``--json``, ``--api-port`` and ``--chat/--no-chat``, handed to the command as one
    ``session`` argument: a :class:`Session`."""

    @functools.wraps(fn)
    def command(*args, prompt, raw, as_json, api_port, with_chat, **kwargs):
        return fn(*args, session=Session(prompt, raw, as_json, api_port, with_chat), **kwargs)

    for opt in reversed(SESSION_OPTIONS):
        command = opt(command)
    return command


@click.command()
@click.option(
    "--agents", "-n", type=click.IntRange(1, 64), default=3, show_default=True, help="Agent processes to start."
)
@MODEL_OPTION
@broker_options(embedded=True)
@click.option(
    "--threads",
    "-t",
    type=click.IntRange(1, 512),
    default=None,
    help="llama.cpp threads per agent [default: all cores but one].",
)
@click.option(
    "--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True, help="Context size in tokens."
)
@session_options
@api_key_option
@serving_options
@HA_OPTION
@KEY_OPTION
@sampling_options
@draft_options
@click.pass_obj
def up(
    obj, agents, model, broker, threads, n_ctx, session, api_key_file, serving, ha_discovery, key_file, sampling, draft
) -> None:
    """Start a whole cluster on this machine and chat with it (or answer --prompt).

    Starts its own MQTT broker on loopback (mosquitto if installed, else the
    embedded amqtt; unless --broker), a controller and N agent processes on
    the model, then the chat. Everything stops on exit.
    With --prompt the completion goes to stdout and logs to stderr.

    Credentials for --broker (--user, --password-file) and the API key reach
    the controller and agents through their environment, not their argv.

    The agents measure this machine and the planner assigns the layers; on one
    machine Halda usually keeps every layer on the head (hops only cost time),
    --planner proportional spreads them over every agent.

    The cluster key (--key-file or the environment) goes to the processes
    through their environment. With the embedded broker and no key, `up`
    makes a random one for its private cluster (other users of this machine
    could otherwise reach the broker and data ports on loopback); with
    --broker and no key the cluster runs open, so others can join or chat.
    """
    from homering.client.local import LocalCluster
    from homering.models.registry import resolve_model
    from homering.secrets import ENV_API_KEY, api_key

    session.check(api_key_file)
    http_key = api_key(api_key_file) if session.api_port else None
    path = resolve_model(model)
    draft_model = draft.check(path, n_ctx=n_ctx, n_parallel=serving.parallel)
    key = _cluster_key(key_file, private=broker is None)
    _exit_on_hangup()
    with LocalCluster(
        path,
        n_agents=agents,
        broker=broker,
        threads=threads,
        n_ctx=n_ctx,
        planner=serving.planner,
        rounds=serving.rounds,
        n_batch=serving.n_batch,
        log_args=child_log_args(obj["verbosity"]),
        controller_args=_controller_args(serving, session.api_port, ha_discovery, draft, draft_model),
        controller_env={ENV_API_KEY: http_key} if http_key else None,
        key=key,
        agent_args=("--ha-discovery",) if ha_discovery else (),
    ) as cluster:
        session.serve(cluster, sampling=sampling, key=key)


def _controller_args(
    serving: ServingSettings, api_port: int | None, ha_discovery: bool, draft: DraftSettings, draft_model=None
) -> tuple[str, ...]:
    """The local controller's command-line arguments (no secrets: those go through its environment)."""
    return (
        *serving.controller_args(),
        *draft.args(draft_model),
        *(("--api-port", str(api_port)) if api_port else ()),
        *(("--ha-discovery",) if ha_discovery else ()),
    )


def _cluster_key(key_file: str | None, *, private: bool):
    """The cluster key from --key-file or the environment; for a ``private`` cluster (the embedded broker)
    without one, a random key, since nobody else needs it."""
    key = cluster_key(key_file)
    if key is None and private:
        from homering.wire.security import ClusterKey, generate_secret

        key = ClusterKey(generate_secret(), source="homering up (random)")
    return key


def _exit_on_hangup() -> None:
    """Exit (so that the cluster stops) on SIGTERM, and on SIGHUP: the terminal closed (the broker has a
    session of its own, so no SIGHUP reaches it)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))

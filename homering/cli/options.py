"""Options and parameter types that several commands share, and the values they turn into.

Every helper here imports its heavy modules inside the function, so that ``homering --help`` stays fast.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import click

MODEL_OPTION = click.option(
    "--model",
    "-m",
    default=None,
    metavar="NAME|PATH",
    help="A known model name (see `homering models list`) or a GGUF path [default: smollm2].",
)


def given(name: str) -> bool:
    """Whether the current command's parameter ``name`` was typed on the command line."""
    ctx = click.get_current_context()
    return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


KEY_OPTION = click.option(
    "--key-file",
    default=None,
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="The cluster key: a file holding a shared secret (e.g. 'openssl rand -hex 32 > cluster.key'); data links "
    "must prove it and plans, jobs and requests are signed with it. Never the secret itself on the command "
    "line [default: $HOMERING_CLUSTER_KEY_FILE, else the secret in $HOMERING_CLUSTER_KEY, else an open "
    "cluster].",
)


def cluster_key(key_file: str | None):
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
    options = _broker_option_list(embedded)

    def wrap(fn):
        @functools.wraps(fn)
        def command(*args, broker, mqtt_user, mqtt_password_file, mqtt_ca_file, **kwargs):
            if embedded and broker is None:
                _refuse_credentials_without_broker()
                return fn(*args, broker=None, **kwargs)
            return fn(*args, broker=broker_url(broker, mqtt_user, mqtt_password_file, mqtt_ca_file), **kwargs)

        for opt in reversed(options):
            command = opt(command)
        return command

    return wrap


def _broker_option_list(embedded: bool) -> list:
    """The click decorators of :func:`broker_options`, in --help order."""
    broker_help = (
        "Use this MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS), instead of starting an embedded one."
        if embedded
        else "MQTT broker, mqtt://HOST:PORT or mqtts://HOST:PORT (TLS, port 8883 by default) "
        "[default: mqtt://127.0.0.1:1883]."
    )
    return [
        click.option("--broker", default=None, metavar="URL", help=broker_help),
        click.option(
            "--user",
            "mqtt_user",
            default=None,
            metavar="NAME",
            envvar="HOMERING_MQTT_USER",
            show_envvar=True,
            help="MQTT user name.",
        ),
        click.option(
            "--password-file",
            "mqtt_password_file",
            default=None,
            metavar="PATH",
            envvar="HOMERING_MQTT_PASSWORD_FILE",
            show_envvar=True,
            help="A file whose first line is the MQTT password (or set the password itself in "
            "$HOMERING_MQTT_PASSWORD; there is no --password: argv is visible to every user).",
        ),
        click.option(
            "--ca-file",
            "mqtt_ca_file",
            default=None,
            metavar="PATH",
            envvar="HOMERING_MQTT_CA_FILE",
            show_envvar=True,
            help="CA certificates (PEM) to trust for an mqtts:// broker [default: the system's].",
        ),
    ]


_CREDENTIAL_OPTIONS = (("user", "mqtt_user"), ("password-file", "mqtt_password_file"), ("ca-file", "mqtt_ca_file"))


def _refuse_credentials_without_broker() -> None:
    """Raise click.UsageError when broker credentials were typed without --broker (the embedded broker is
    anonymous)."""
    typed = [f"--{name}" for name, param in _CREDENTIAL_OPTIONS if given(param)]
    if typed:
        verb = "goes" if len(typed) == 1 else "go"
        raise click.UsageError(f"{' and '.join(typed)} {verb} with --broker (the embedded broker is anonymous)")


def broker_url(url: str | None, user: str | None = None, password_file: str | None = None, ca_file: str | None = None):
    """The broker at ``url`` (default mqtt://127.0.0.1:1883) with credentials from options or the environment."""
    from homering.transport.mqtt import DEFAULT_BROKER, BrokerAuth, BrokerURL

    return BrokerURL.parse(url or DEFAULT_BROKER, BrokerAuth.load(user, password_file, ca_file))


def api_key_option(fn):
    """``--api-key-file``: the key the OpenAI-compatible API requires (as ``api_key_file``)."""
    return click.option(
        "--api-key-file",
        default=None,
        metavar="PATH",
        envvar="HOMERING_API_KEY_FILE",
        show_envvar=True,
        help="Require `Authorization: Bearer KEY` on the API (/v1/*, /metrics; /health stays open), KEY being "
        "this file's first line; or set the key itself in $HOMERING_API_KEY. There is no --api-key: "
        "argv is visible to every user.",
    )(fn)


# ---------------------------------------------------------------- the controller's plan and queue
ROUNDS_OPTION = click.option(
    "--rounds",
    "-k",
    type=click.IntRange(1, 1 << 16),
    default=None,
    help="Piped-ring rounds k: every agent holds k windows and a token goes k times around the ring "
    "(must divide the layer count) [default: the planner chooses].",
)
BATCH_OPTION = click.option(
    "--batch",
    "n_batch",
    type=click.IntRange(1, 1 << 16),
    default=None,
    help="Prefill micro-batch in tokens: a prompt flows through the ring in chunks of this size, "
    "back to back, so devices work on different chunks at once [default: 64].",
)
PARALLEL_OPTION = click.option(
    "--parallel",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Requests served at once: each gets its own KV sequence of --ctx tokens in every window, and "
    "the ring works on several of them at a time.",
)
QUEUE_OPTION = click.option(
    "--queue",
    "max_queue",
    type=click.IntRange(0, 1 << 16),
    default=16,
    show_default=True,
    help="Requests that may wait for a free sequence; more are refused (HTTP 429).",
)
HA_OPTION = click.option(
    "--ha-discovery", is_flag=True, help="Announce the cluster to Home Assistant (MQTT discovery)."
)
PLANNER_OPTION = click.option(
    "--planner",
    type=click.Choice(["halda", "memory", "proportional"]),
    default="halda",
    show_default=True,
    help="How layers are assigned: halda (the fastest predicted plan), memory (exo-style, by memory), "
    "proportional (by available RAM, every agent used).",
)


@dataclass(frozen=True)
class ServingSettings:
    """How the controller plans the ring and admits requests (from :func:`serving_options`).

    ``planner`` is halda, memory or proportional; ``rounds`` the piped-ring rounds k (None: the planner
    chooses); ``n_batch`` the prefill micro-batch in tokens (None: the controller's default); ``parallel`` the
    requests served at once; ``max_queue`` the requests that may wait for a free sequence.
    """

    planner: str
    rounds: int | None
    n_batch: int | None
    parallel: int
    max_queue: int

    def controller_args(self) -> tuple[str, ...]:
        """The ``homering controller`` arguments for ``parallel`` and ``max_queue`` (the planner, rounds and
        batch reach a local cluster as its own parameters)."""
        return ("--parallel", str(self.parallel), "--queue", str(self.max_queue))


SERVING_OPTIONS = [PLANNER_OPTION, ROUNDS_OPTION, BATCH_OPTION, PARALLEL_OPTION, QUEUE_OPTION]


def serving_options(fn):
    """``--planner``, ``--rounds``, ``--batch``, ``--parallel`` and ``--queue``, handed to the command as one
    ``serving`` argument: a :class:`ServingSettings`."""

    @functools.wraps(fn)
    def command(*args, planner, rounds, n_batch, parallel, max_queue, **kwargs):
        serving = ServingSettings(planner, rounds, n_batch, parallel, max_queue)
        return fn(*args, serving=serving, **kwargs)

    for opt in reversed(SERVING_OPTIONS):
        command = opt(command)
    return command


# ---------------------------------------------------------------- sampling
def sampling_settings(max_tokens, temperature, seed):
    """The command line's sampling settings; top_k, top_p and min_p keep :class:`Sampling`'s (llama.cpp's) defaults."""
    from homering.engine.sampling import Sampling

    return Sampling(max_tokens=max_tokens, temperature=temperature, seed=seed)


SAMPLING_OPTIONS = [
    click.option(
        "--max-tokens", type=click.IntRange(1, 1 << 20), default=256, show_default=True, help="Most tokens to generate."
    ),
    click.option(
        "--temperature",
        type=click.FloatRange(0, 10),
        default=0.8,
        show_default=True,
        help="Sampling temperature; 0 is greedy (top_k 40, top_p 0.95, min_p 0.05: llama.cpp's defaults).",
    ),
    click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Sampling seed."),
]


def sampling_options(fn):
    """``--max-tokens``, ``--temperature`` and ``--seed``, handed to the command as one ``sampling`` argument
    (a :class:`~homering.engine.sampling.Sampling`, see :func:`sampling_settings`)."""

    @functools.wraps(fn)
    def command(*args, max_tokens, temperature, seed, **kwargs):
        return fn(*args, sampling=sampling_settings(max_tokens, temperature, seed), **kwargs)

    for opt in reversed(SAMPLING_OPTIONS):
        command = opt(command)
    return command


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


def child_log_args(verbosity: int) -> tuple[str, ...]:
    """The -v/-q flags of the processes a command starts (agents, controllers) for the command's own
    verbosity (``homering -v …``): at the default they run one step quieter (warnings only)."""
    return ("-v",) * verbosity if verbosity > 0 else ("-q",) * (1 - verbosity)

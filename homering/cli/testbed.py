"""``homering testbed up|down|run``: an emulated home cluster on this machine (root, Linux)."""

from __future__ import annotations

import signal
import sys

import click

from homering.cli.options import PLANNER_OPTION, ROUNDS_OPTION, cluster_key, sampling_options
from homering.cli.running import run, watch
from homering.errors import HomeringError


@click.group()
def testbed() -> None:
    """An emulated home cluster on this machine (needs root on Linux).

    Every device of a YAML spec (see examples/clusters/home4.yaml) gets its own
    network namespace on a bridge, a shaped link, and cgroups for its RAM, CPU
    quota and disk read speed.
    """


SPEC_OPTION = click.option(
    "--spec", "spec_file", required=True, type=click.Path(dir_okay=False), help="The testbed spec (YAML)."
)
WORKDIR_OPTION = click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Devices' homes, logs and state [default: <HOMERING_HOME>/testbeds/<name>].",
)


ALLOW_NO_DELAY_OPTION = click.option(
    "--allow-no-delay",
    is_flag=True,
    help="Run without the spec's link delay and jitter where neither sch_netem nor NFQUEUE can emulate them "
    "[default: refuse].",
)


def _testbed(spec_file, workdir, allow_no_delay=False):
    """The testbed of a spec file (not up yet); HomeringError for a bad spec, or when not root on Linux."""
    from pathlib import Path

    from homering.testbed import Testbed, default_workdir, load_spec, require_root

    spec = load_spec(spec_file)
    require_root()
    return Testbed(spec, workdir=Path(workdir) if workdir else default_workdir(spec), allow_no_delay=allow_no_delay)


def _print_shaping(console, tb) -> None:
    """Which link shaping is active, then the testbed's warnings."""
    from homering.testbed.netns import shaping_summary

    console.print(f"link shaping: [bold]{shaping_summary(tb.shaping)}[/]")
    for w in tb.warnings:
        console.print(f"[yellow]warning:[/] {w}")


def _testbed_table(tb):
    """A rich table of an up testbed's devices: address, RAM, CPUs, disk and link."""
    from rich.table import Table

    from homering.testbed.spec import format_bytes

    table = Table(
        title=f"testbed {tb.name} on {tb.subnet} · broker {tb.broker_url}",
        caption=f"host {tb.host_address} · bridge namespace {tb.bridge_netns} ({tb.bridge_address})",
    )
    for col in ("device", "address", "RAM", "CPUs", "disk read", "link"):
        table.add_column(col, justify="right" if col in ("RAM", "CPUs") else "left")
    for name in tb.devices:
        d = tb.describe(name)
        table.add_row(name, d["address"], format_bytes(d["ram"]), f"{d['cpus']:g}", d["disk"], d["shaping"])
    return table


@testbed.command("up")
@SPEC_OPTION
@WORKDIR_OPTION
@ALLOW_NO_DELAY_OPTION
def testbed_up(spec_file, workdir, allow_no_delay) -> None:
    """Create the testbed and its MQTT broker and leave them up (`homering testbed down` removes them).

    Link delay and jitter: netem, or where the kernel lacks sch_netem, NFQUEUE and a delayer process per
    device (iptables and the NetfilterQueue package); a spec with a delay that neither can emulate is
    refused unless --allow-no-delay."""
    from rich.console import Console

    tb = _testbed(spec_file, workdir, allow_no_delay)
    tb.up()
    try:
        tb.start_broker()
    except BaseException:
        tb.down()
        raise
    console = Console()
    console.print(_testbed_table(tb))
    _print_shaping(console, tb)
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


def _testbed_check(procs, tb):
    """A ``check`` for :func:`~homering.cli.running.watch`: raise HomeringError as soon as one of the testbed's
    ``procs`` exits."""

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
@click.option(
    "--model",
    "-m",
    default=None,
    metavar="NAME|PATH",
    help="A known model name or a GGUF path [default: the spec's model].",
)
@PLANNER_OPTION
@ROUNDS_OPTION
@click.option(
    "--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True, help="Context size in tokens."
)
@click.option("--prompt", "-p", default=None, help="Answer this one prompt and exit (no chat).")
@click.option("--json", "as_json", is_flag=True, help="With --prompt: print one JSON object.")
@click.option(
    "--timeout",
    type=click.FloatRange(1),
    default=600.0,
    show_default=True,
    help="Seconds to wait for the cluster to be ready (the agents profile under their limits).",
)
@ALLOW_NO_DELAY_OPTION
@sampling_options
@click.pass_obj
def testbed_run(
    obj, spec_file, workdir, model, planner, rounds, n_ctx, prompt, as_json, timeout, allow_no_delay, sampling
) -> None:
    """Bring the testbed up, run a broker, one agent per device and a controller in it, answer --prompt (or
    chat), then take everything down.

    The model is the spec's `model` unless --model is given. Children's logs go to
    <workdir>/logs/<name>.log.
    """
    from rich.console import Console

    from homering.client.chat import chat as chat_loop
    from homering.client.chat import one_shot
    from homering.models.registry import resolve_model
    from homering.transport.mqtt import BrokerURL

    if as_json and prompt is None:
        raise click.UsageError("--json goes with --prompt")
    tb = _testbed(spec_file, workdir, allow_no_delay)
    path = resolve_model(model or tb.spec.model)
    key = cluster_key(None)  # the children inherit this environment, and with it any cluster key
    verbosity = obj["verbosity"]
    log_args = ("-v",) * verbosity if verbosity > 0 else ("-q",) * -verbosity
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tb:
        url = tb.start_broker()
        procs = _start_processes(
            tb, url, path, log_args=log_args, planner=planner, rounds=rounds, n_ctx=n_ctx, timeout=timeout
        )
        console = Console(stderr=True)
        console.print(_testbed_table(tb))
        _print_shaping(console, tb)
        console.print(f"[dim]model {path.name}; logs in {tb.workdir / 'logs'}[/]")
        broker_url = BrokerURL.parse(url)
        if prompt is not None:
            run(
                watch(
                    one_shot(
                        broker_url,
                        prompt,
                        raw=False,
                        sampling=sampling,
                        as_json=as_json,
                        ready_timeout=timeout,
                        key=key,
                    ),
                    _testbed_check(procs, tb),
                )
            )
        else:
            run(chat_loop(broker_url, sampling=sampling, ready_timeout=timeout, key=key))


def _start_processes(tb, url: str, path, *, log_args, planner, rounds, n_ctx, timeout) -> list:
    """A controller in the bridge namespace and one agent per device; returns their processes, each with a
    ``role`` (for messages) and a ``log_name``."""
    py = [sys.executable, "-m", "homering"]
    procs = []

    def start(device, argv, name, role):
        p = tb.spawn_logged(device, argv, name)
        p.role, p.log_name = role, name
        procs.append(p)

    start(
        None,
        [
            *py,
            *log_args,
            "controller",
            "--broker",
            url,
            "--model",
            str(path),
            "--agents",
            str(len(tb.devices)),
            "--planner",
            planner,
            *(("--rounds", str(rounds)) if rounds else ()),
            "--ctx",
            str(n_ctx),
            "--timeout",
            f"{timeout / 2:g}",
        ],
        "controller",
        "the controller",
    )
    for name in tb.devices:
        start(
            name,
            [*py, "-q", "agent", "--broker", url, "--name", name, "--threads", "1", "--host", tb.address(name)],
            name,
            f"agent {name}",
        )
    return procs

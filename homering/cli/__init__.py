"""The ``homering`` command line: the ``cli`` group, its global options, and :func:`main` (the entry point).

One module per command group: :mod:`.models`, :mod:`.agent`, :mod:`.controller` (and the hidden ``broker``),
:mod:`.chat`, :mod:`.up`, :mod:`.profile`, :mod:`.plan`, :mod:`.bench`, :mod:`.testbed` and :mod:`.healthcheck`;
the options they share are in :mod:`.options`. Commands import their heavy modules when they run, so
``homering --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys

import click

from homering.cli import agent as _agent
from homering.cli import bench as _bench
from homering.cli import chat as _chat
from homering.cli import controller as _controller
from homering.cli import healthcheck as _healthcheck
from homering.cli import models as _models
from homering.cli import plan as _plan
from homering.cli import profile as _profile
from homering.cli import testbed as _testbed
from homering.cli import up as _up
from homering.errors import HomeringError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _setup_logging(verbosity: int) -> None:
    level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(max(verbosity, -2), logging.DEBUG)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
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


for _command in (
    _models.models,
    _agent.agent,
    _controller.controller,
    _controller.broker,
    _chat.chat,
    _up.up,
    _profile.profile,
    _plan.plan_cmd,
    _bench.bench,
    _testbed.testbed,
    _healthcheck.healthcheck,
):
    cli.add_command(_command)

models_synth = _models.models_synth  # the command object, for callers that read its parameters


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

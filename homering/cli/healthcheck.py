"""``homering healthcheck``: is the agent's data plane up? (the agent container's HEALTHCHECK)."""

from __future__ import annotations

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address of the agent's data port.")
@click.option(
    "--port", "data_port", type=click.IntRange(1, 65535), default=7070, show_default=True, help="The data port."
)
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=3.0, show_default=True, help="Seconds per step.")
def healthcheck(host: str, data_port: int, timeout: float) -> None:
    """Probe an agent's data port the way its ring neighbours reach it, with a health frame of its own.

    Exit 0 when it answers; otherwise one line on stderr and exit 1. The agent answers the probe without a
    handshake and logs nothing (a bare TCP connect would be logged as a failed handshake).
    """
    from homering.transport.links import probe_health

    try:
        probe_health(host, data_port, timeout)
    except ConnectionError as exc:
        click.echo(f"homering healthcheck: unhealthy: {exc}", err=True)
        raise SystemExit(1) from None

"""The embedded MQTT broker (amqtt), so that one command runs a whole cluster on one machine."""

from __future__ import annotations

import asyncio
import logging
import socket

log = logging.getLogger("homering.broker")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def run_broker(host: str = "127.0.0.1", port: int = 1883) -> None:
    """Run an amqtt broker (anonymous, loopback by default) until cancelled."""
    from amqtt.broker import Broker

    if not log.isEnabledFor(logging.DEBUG):
        # amqtt logs every half-open probe connection as an error
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    log.info("embedded broker on mqtt://%s:%d", host, port)
    try:
        await asyncio.Event().wait()
    finally:
        await broker.shutdown()


def wait_for_port(host: str, port: int, timeout: float = 20.0) -> bool:
    """Block until something accepts TCP connections on host:port (or the timeout)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False

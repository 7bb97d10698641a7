"""The broker a one-machine cluster starts: mosquitto when it is installed, else the embedded amqtt broker.

mosquitto (C) costs far less CPU per message than amqtt (Python), which
matters when the agents, the controller and the broker share a laptop's
cores; amqtt keeps ``homering up`` working where mosquitto is not installed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket

log = logging.getLogger("homering.broker")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    """The mosquitto executable, if installed (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def mosquitto_config(host: str, port: int, *, log: bool = False) -> str:
    """A mosquitto.conf for an anonymous broker on ``host:port`` that keeps nothing on disk."""
    return (f"listener {port} {host}\nallow_anonymous true\npersistence false\n"
            + ("log_dest stderr\n" if log else "log_dest none\n"))


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

"""The testbed's MQTT broker: mosquitto (or homering's embedded amqtt broker) in the bridge namespace."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from homering.errors import HomeringError

log = logging.getLogger("homering.testbed")

BROKER_PORT = 1883


def start_broker(
    spawn: Callable[[list[str]], subprocess.Popen],
    *,
    workdir: Path,
    host: str,
    port: int,
    timeout: float,
    log_file: Path,
) -> subprocess.Popen:
    """Start a broker on ``host:port`` with ``spawn(argv)`` (in the bridge namespace, its output in
    ``log_file``) and wait until it accepts connections from here.

    Raises:
        HomeringError: it exited, or did not listen within ``timeout`` s.
    """
    from homering.transport.broker import mosquitto_binary, wait_for_port, write_mosquitto_config

    exe = mosquitto_binary()
    if exe:
        conf = write_mosquitto_config(workdir, host, port, log=True)
        argv = [exe, "-c", str(conf)]
    else:
        log.warning("mosquitto is not installed: the testbed uses homering's embedded broker (amqtt)")
        argv = [sys.executable, "-m", "homering", "broker", "--host", host, "--port", str(port)]
    proc = spawn(argv)
    deadline = time.monotonic() + timeout
    while not wait_for_port(host, port, timeout=0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise HomeringError(f"the testbed's MQTT broker did not start on {host}:{port} (see {log_file})")
    return proc


def stop_broker(proc: subprocess.Popen | None, grace: float = 5.0) -> None:
    """SIGTERM the broker, SIGKILL it after ``grace`` s (its retained messages go with it)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False

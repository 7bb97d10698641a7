"""Quiet exits: examples/three-agents.sh and homering's processes on SIGINT / SIGTERM, real processes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_mosquitto

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "three-agents.sh"
HR = f"{sys.executable} -m homering"
# what must never reach the terminal on the way out
NOISE = re.compile(
    r"Traceback|ERROR|Fatal Python error|exception was never retrieved|Broken pipe|"
    r"went offline|lost the broker"
)


class Reader:
    """Collects a pipe's text as it comes, on a thread; ``wait_for`` a pattern."""

    def __init__(self, stream) -> None:
        self.text = ""
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        fd = stream.fileno()
        while chunk := os.read(fd, 65536):  # not by lines: the chat's prompt ends none
            with self._lock:
                self.text += chunk.decode(errors="replace")

    def wait_for(self, pattern: str, proc: subprocess.Popen, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = re.search(pattern, self.text)
            if found:
                return found
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"no {pattern!r} (exit code {proc.poll()}):\n{self.text[-3000:]}")

    def close(self) -> str:
        self._thread.join(10)
        return self.text


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pids_using(broker: str) -> list[int]:
    """Processes whose command line names ``broker`` (the script's homering processes)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if broker.encode() in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                pass
    return out


@contextlib.contextmanager
def sigint_not_ignored():
    """Processes started inside see SIGINT's default action, as a terminal's foreground job does, even when
    pytest itself ignores SIGINT: a background job of a non-interactive shell (``sh -c 'make test &'``)
    starts with SIGINT ignored, an exec keeps it ignored, and a non-interactive bash then silently drops
    ``trap ... INT``. Python's own handler becomes the default action across an exec."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_three_agents_script_stops_quietly_on_ctrl_c(smollm2, tmp_path):
    """The script starts mosquitto on a free port, the cluster and the chat; Ctrl-C (SIGINT to the
    terminal's process group) while the chat waits for input ends everything, in order, with no
    traceback or error on stderr, and leaves no process and no temporary folder behind."""
    env = {k: v for k, v in os.environ.items() if k != "BROKER"} | {"HR": HR, "TMPDIR": str(tmp_path)}
    with sigint_not_ignored():  # bash cannot trap a SIGINT that was ignored when it started
        proc = subprocess.Popen(
            ["bash", str(SCRIPT)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # its own process group, as a terminal's foreground job
    err, out = Reader(proc.stderr), Reader(proc.stdout)
    try:
        broker = err.wait_for(r"three-agents\.sh: broker (mqtt://127\.0\.0\.1:\d+)", proc, 30).group(1)
        out.wait_for(r"you> ", proc, 240)  # the cluster is ready and the chat reads its input
        started = pids_using(broker)
        assert len(started) == 5, started  # three agents, the controller, the chat
        os.killpg(proc.pid, signal.SIGINT)  # stdin stays open: the chat must not wait for a line
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:  # a failure: let the script's cleanup run (mosquitto has a session of its own)
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    stderr = err.close()
    out.close()
    noise = [line for line in stderr.splitlines() if NOISE.search(line)]
    assert not noise, stderr[-3000:]
    assert not [p for p in started if alive(p)]
    assert not pids_using(broker)
    assert not pids_using(str(tmp_path))  # mosquitto (its config is in the script's folder)
    assert not list(tmp_path.glob("homering-three-agents.*"))  # the script's folder (mosquitto's log)


def test_three_agents_script_refuses_a_taken_port():
    """A BROKER whose port is taken (e.g. by the system's mosquitto) is one line and exit code 1, and
    no homering process starts against the other broker."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            ["bash", str(SCRIPT)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HR": HR, "BROKER": f"mqtt://127.0.0.1:{port}"},
        )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "Address already in use" in lines[0], proc.stderr
    assert proc.stdout == ""


class CuttingProxy:
    """A TCP proxy to the broker that, once ``armed``, drops the connection (both ways, nothing forwarded)
    when the client sends a message containing ``cut_on``: the broker "goes away" at that very moment."""

    def __init__(self, target: tuple[str, int], cut_on: bytes) -> None:
        self.target, self.cut_on = target, cut_on
        self.armed, self.cut = threading.Event(), threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.server.accept()
                broker = socket.create_connection(self.target)
                threading.Thread(target=self._pump, args=(client, broker, True), daemon=True).start()
                threading.Thread(target=self._pump, args=(broker, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if upstream and self.armed.is_set() and self.cut_on in data:
                    self.cut.set()
                    break
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.server.close()


def test_an_agent_stopped_as_the_broker_goes_exits_quietly(tmp_path):
    """SIGTERM, then the broker connection breaks while the agent says goodbye (its "offline" status): what
    a script that stops the broker with everything else does. The agent exits with 0 and says nothing:
    no "Future exception was never retrieved" (aiomqtt's unretrieved disconnection), no paho
    "Broken pipe" error, no reconnect."""
    with run_mosquitto(tmp_path) as broker:
        proxy = CuttingProxy((broker.host, broker.port), b'"state":"offline"')
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "homering",
                "agent",
                "--broker",
                f"mqtt://127.0.0.1:{proxy.port}",
                "--name",
                "quiet",
                "--threads",
                "1",
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        err = Reader(proc.stderr)
        try:
            err.wait_for(r"agent quiet up", proc, 60)
            proxy.armed.set()  # (the will in CONNECT says "offline" too: that went through already)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proxy.close()
    stderr = err.close()
    assert proxy.cut.is_set(), stderr  # the connection broke during the goodbye
    assert not [line for line in stderr.splitlines() if NOISE.search(line)], stderr


def test_paho_socket_errors_log_at_debug(caplog):
    """paho's "failed to receive on socket: [Errno 32] Broken pipe" (an ERROR line on every broker loss,
    which homering reports once itself) logs at DEBUG; paho's other errors keep their level."""
    import asyncio
    import logging

    from homering.transport import mqtt
    from homering.transport.mqtt import BrokerURL

    async def made():  # an aiomqtt client is made on a running loop
        return mqtt.client(BrokerURL("127.0.0.1", 1883))

    log = asyncio.run(made())._client.logger  # the logger paho and aiomqtt write to
    with caplog.at_level(logging.INFO):
        log.error("failed to receive on socket: %s", BrokenPipeError(32, "Broken pipe"))
        log.error("Caught exception in on_message: %s", "boom")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "Caught exception in on_message: boom")
    ]
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        log.error("failed to receive on socket: %s", "[Errno 32] Broken pipe")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "failed to receive on socket: [Errno 32] Broken pipe")
    ]

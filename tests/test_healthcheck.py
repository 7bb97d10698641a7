"""`homering healthcheck`: the agent's data port answers a health probe of its own, without a handshake and
without the warning a failed handshake logs; garbage is still logged and dropped, and links still work."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading

import pytest

from homering.transport.broker import free_port
from homering.transport.links import LinkServer, connect_link, probe_health, recv_frame, send_frame
from homering.wire.frames import Frame
from homering.wire.security import ClusterKey

KEY = ClusterKey("k" * 32, source="test")


def _healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "homering", "healthcheck", *args], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(params=[None, KEY], ids=["open", "keyed"])
def server(request):
    """A data port (the agent's LinkServer) whose links echo PING frames as PONGs; with and without a key."""

    def handler(conn: socket.socket) -> None:
        while recv_frame(conn) is not None:
            send_frame(conn, Frame.pong())

    srv = LinkServer("127.0.0.1", 0, handler, key=request.param)
    yield srv, request.param
    srv.close()


def test_the_probe_passes_and_logs_nothing(server, caplog):
    srv, _ = server
    with caplog.at_level(logging.DEBUG, logger="homering.links"):
        done = _healthcheck(f"--port={srv.port}")
        assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done
        probe_health("127.0.0.1", srv.port, timeout=3)  # and in-process, needing no key
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "answered a health probe" in caplog.text


def test_garbage_is_still_logged_and_dropped_and_links_still_work(server, caplog):
    srv, key = server
    with caplog.at_level(logging.WARNING, logger="homering.links"):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
            s.sendall(b"HRNX" + bytes(66))  # not the probe's magic, not a handshake reply
            got = b""
            while chunk := s.recv(4096):
                got += chunk
            assert got[:4] == b"HRNA"  # the hello, then the server hung up
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5):
            pass  # a bare connect (the old healthcheck): logged when the server gives up on it
        waited = threading.Event()
        for _ in range(100):
            if caplog.text.count("handshake failed") >= 2:
                break
            waited.wait(0.1)
    assert caplog.text.count("handshake failed") == 2, caplog.text
    assert _healthcheck(f"--port={srv.port}").returncode == 0  # the server serves on
    with connect_link("127.0.0.1", srv.port, key=key, timeout=5) as link:
        send_frame(link, Frame.ping(16))
        assert recv_frame(link) is not None


def test_no_data_port_fails_in_one_line():
    done = _healthcheck(f"--port={free_port()}")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "unhealthy" in done.stderr, done


def test_another_service_on_the_port_fails_in_one_line():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def talk() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(64))

    threading.Thread(target=talk, daemon=True).start()
    try:
        done = _healthcheck(f"--port={port}", "--timeout=2")
    finally:
        listener.close()
    assert done.returncode == 1 and "not a homering data port" in done.stderr, done
    assert len(done.stderr.strip().splitlines()) == 1

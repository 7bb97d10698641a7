"""Data-plane links: frames of hidden states between ring neighbours over TCP sockets.

A link starts with the handshake of :mod:`homering.wire.handshake` (both ends prove
they hold the cluster key), then carries the frames of :mod:`homering.wire.frames`,
each validated before use (:func:`recv_frame`). Links set TCP_NODELAY: a decode step
sends one small frame per hop and must not wait for Nagle.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time

from homering.wire.frames import FLAG_MORE, HEADER, Frame, FrameError, FrameHeader, FrameKind, decode_payload
from homering.wire.handshake import (
    HandshakeError,
    HealthProbed,
    client_handshake,
    health_probe,
    recv_exact,
    server_handshake,
)
from homering.wire.security import ClusterKey

log = logging.getLogger("homering.links")

MAX_GROUP = 1024  # frames in one group


def recv_frame(sock: socket.socket) -> Frame | None:
    """Read one frame from a blocking socket; None at a clean end of stream.

    The header is validated (:meth:`FrameHeader.unpack`) before its payload is
    read; hidden states must be finite (no NaN or ±Inf).

    Raises:
        FrameError: a header or payload that fails validation (the caller drops the link).
        ConnectionError: the peer closed mid-frame.
    """
    raw = recv_exact(sock, HEADER.size, allow_eof=True)
    if raw is None:
        return None
    header = FrameHeader.unpack(bytes(raw))
    body = recv_exact(sock, header.payload_len) if header.payload_len else bytearray()
    return decode_payload(header, body)


def send_frame(sock: socket.socket, frame: Frame) -> None:
    """Send one frame on a blocking socket (one ``sendmsg`` when the kernel takes it all)."""
    parts = frame.encode()
    total = sum(len(p) for p in parts)
    sent = sock.sendmsg(parts)
    if sent < total:
        sock.sendall(b"".join(bytes(p) for p in parts)[sent:])


def send_group(sock: socket.socket, frames: list[Frame]) -> None:
    """Send ``frames`` as one group (``FLAG_MORE`` on all but the last), in one ``sendmsg`` when possible."""
    parts: list[bytes | memoryview] = []
    for i, f in enumerate(frames):
        flags = (f.header.flags & ~FLAG_MORE) | (FLAG_MORE if i + 1 < len(frames) else 0)
        if f.header.flags != flags:
            f = Frame(dataclasses.replace(f.header, flags=flags), f.payload)
        parts.extend(f.encode())
    total = sum(len(p) for p in parts)
    sent = sock.sendmsg(parts)
    if sent < total:
        sock.sendall(b"".join(bytes(p) for p in parts)[sent:])


def recv_group(sock: socket.socket) -> list[Frame] | None:
    """Read one group of frames (up to a frame without ``FLAG_MORE``); None at a clean end of stream.

    Raises:
        FrameError: a bad header, or a group longer than :data:`MAX_GROUP`.
        ConnectionError: the peer closed mid-group.
    """
    first = recv_frame(sock)
    if first is None:
        return None
    group = [first]
    while group[-1].header.more:
        if len(group) >= MAX_GROUP:
            raise FrameError(f"a group of more than {MAX_GROUP} frames")
        nxt = recv_frame(sock)
        if nxt is None:
            raise ConnectionError("peer closed the link mid-group")
        group.append(nxt)
    return group


def set_nodelay(sock: socket.socket) -> None:
    """Disable Nagle's algorithm: a decode step sends one small frame per hop."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_link(
    host: str, port: int, *, timeout: float = 30.0, key: ClusterKey | None = None, give_up=None
) -> socket.socket:
    """Connect to a neighbour's data port (retrying until ``timeout`` seconds pass) and run the handshake.

    ``give_up()``, when given, is asked before every retry: True stops
    retrying (the plan this link was for has been replaced).

    Returns a blocking socket with TCP_NODELAY, ready for frames.

    Raises:
        HandshakeError: the handshake failed (not retried: another key will not change).
        ConnectionError: the neighbour did not accept in time, ``give_up()``, or ``host`` is no host name.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5.0)
        except ValueError as exc:  # a host name that cannot be encoded (e.g. an IDNA label over 63 bytes)
            raise ConnectionError(f"cannot reach data port {host}:{port}: {exc}") from None
        except OSError as exc:
            if give_up is not None and give_up():
                raise ConnectionError(f"gave up connecting to {host}:{port}") from None
            if time.monotonic() + delay > deadline:
                raise ConnectionError(f"cannot reach data port {host}:{port}: {exc}") from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        try:
            set_nodelay(sock)
            client_handshake(sock, key)
            sock.settimeout(None)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, HandshakeError):
                raise HandshakeError(f"data link to {host}:{port}: {exc}") from None
            raise
        return sock


def measure_link(
    host: str,
    port: int,
    *,
    pings: int = 9,
    probe_bytes: int = 1 << 22,
    transfers: int = 3,
    timeout: float = 10.0,
    key: ClusterKey | None = None,
) -> tuple[float, float]:
    """Measure a data-plane link with PING/PONG frames: (one-way latency ms, bandwidth Mbit/s).

    Latency is half the median round trip of empty pings; bandwidth is
    ``probe_bytes`` over the best time of ``transfers`` padded pings, less one
    round trip. Each round trip includes the receiver's frame handling, as a
    real hop does.

    Raises:
        ConnectionError: the peer is unreachable, failed the handshake (:class:`HandshakeError`,
            ``key`` is the cluster key) or did not answer.
    """
    sock = connect_link(host, port, timeout=timeout, key=key)
    sock.settimeout(timeout)
    try:

        def round_trip(frame: Frame) -> float:
            t0 = time.perf_counter()
            send_frame(sock, frame)
            got = recv_frame(sock)
            if got is None or got.header.kind is not FrameKind.PONG:
                raise ConnectionError(f"{host}:{port} did not answer the link probe")
            return time.perf_counter() - t0

        round_trip(Frame.ping())  # warm up the peer's link thread
        rtts = sorted(round_trip(Frame.ping()) for _ in range(pings))
        rtt = rtts[len(rtts) // 2]
        big = min(round_trip(Frame.ping(probe_bytes)) for _ in range(transfers))
        seconds = max(big - rtt, 1e-6)
        return rtt * 1000 / 2, probe_bytes * 8 / seconds / 1e6
    except (OSError, FrameError) as exc:
        raise ConnectionError(f"link probe to {host}:{port} failed: {exc}") from None
    finally:
        sock.close()


def probe_health(host: str, port: int, timeout: float = 3.0) -> None:
    """Check that the data port at ``host:port`` accepts links and answers (``homering healthcheck``): the
    probe of :func:`homering.wire.handshake.health_probe`, which the server does not log.

    Raises:
        ConnectionError: nothing listens, or what listens does not answer as a homering data port within
            ``timeout`` seconds.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            health_probe(sock, timeout)
    except HandshakeError as exc:
        raise ConnectionError(f"{host}:{port}: {exc}") from None
    except OSError as exc:
        raise ConnectionError(f"{host}:{port}: {exc.strerror or exc}") from None


class LinkServer:
    """Accepts data-plane links; each link is served by ``handler(sock)`` in its own thread.

    Blocking sockets and threads, not asyncio: a hop then costs one wake-up
    (the receiving thread), and decode runs in that worker thread while the
    asyncio loop serves MQTT. Every link first passes :func:`server_handshake`
    with ``key`` in its own thread; a peer that fails is logged (one line)
    and dropped, and the server keeps accepting. A health probe (:func:`probe_health`) is answered and
    not logged.
    """

    def __init__(self, bind: str, port: int, handler, *, key: ClusterKey | None = None):
        self._sock = socket.create_server((bind, port), reuse_port=False)
        self.port = self._sock.getsockname()[1]
        self._handler = handler
        self._key = key
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="link-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            set_nodelay(conn)
            threading.Thread(target=self._serve, args=(conn,), name="link", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            peer = "?"
            try:
                peer = conn.getpeername()
                server_handshake(conn, self._key)
            except HealthProbed:
                log.debug("answered a health probe from %s", peer)
                return
            except (HandshakeError, OSError) as exc:
                log.warning("dropping data link from %s: handshake failed: %s", peer, exc)
                return
            self._handler(conn)

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

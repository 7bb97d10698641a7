"""Data plane: binary frames of hidden states between ring neighbours over TCP.

A link starts with a handshake in which both ends prove they hold the
cluster key (:func:`server_handshake`, :func:`client_handshake`; the bytes are
in :mod:`homering.cluster.schema`). Then frames: a fixed
:data:`homering.cluster.schema.HEADER` and a raw payload (see
:class:`~homering.cluster.schema.FrameHeader`), validated before use
(:func:`recv_frame`). Links set TCP_NODELAY: a decode step sends one small
frame per hop and must not wait for Nagle.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from homering.cluster.schema import (
    FLAG_MORE, HEADER, LINK_ACCEPT, LINK_ACCEPT_MAGIC, LINK_CLIENT_LABEL, LINK_HANDSHAKE_TIMEOUT_S, LINK_HELLO,
    LINK_MAGIC, LINK_MODE_KEYED, LINK_MODE_OPEN, LINK_NONCE_BYTES, LINK_REPLY, LINK_SERVER_LABEL, LINK_VERSION,
    MAX_ERROR_BYTES, DType, FrameError, FrameHeader, FrameKind, HandshakeError,
)
from homering.cluster.security import ClusterKey

log = logging.getLogger("homering.dataplane")

MAX_GROUP = 1024  # frames in one group


@dataclass
class Frame:
    """A decoded frame: its header and payload (token ids, hidden states, or text)."""

    header: FrameHeader
    payload: np.ndarray | str | None

    @classmethod
    def forward(cls, request_id: int, seq_id: int, pos: int, data: np.ndarray, round: int = 0) -> "Frame":
        """A FORWARD frame: ``data`` is (n,) int32 token ids or (n, n_embd) float32 hidden states."""
        if data.ndim == 1:
            data = np.ascontiguousarray(data, dtype=np.int32)
            header = FrameHeader(FrameKind.FORWARD, DType.TOKENS, request_id, seq_id, round, pos,
                                 data.shape[0], 0, data.nbytes)
        else:
            data = np.ascontiguousarray(data, dtype=np.float32)
            header = FrameHeader(FrameKind.FORWARD, DType.F32, request_id, seq_id, round, pos,
                                 data.shape[0], data.shape[1], data.nbytes)
        return cls(header, data)

    @classmethod
    def kv_remove(cls, request_id: int, seq_id: int, p0: int) -> "Frame":
        """Ask every window in the ring to drop positions >= ``p0`` of ``seq_id``."""
        return cls(FrameHeader(FrameKind.KV_REMOVE, DType.NONE, request_id, seq_id, 0, p0, 0, 0, 0), None)

    @classmethod
    def error(cls, request_id: int, seq_id: int, message: str) -> "Frame":
        """Tell the head that a window failed for this request."""
        raw = message.encode()[:MAX_ERROR_BYTES]
        return cls(FrameHeader(FrameKind.ERROR, DType.TEXT, request_id, seq_id, 0, 0, 0, 0, len(raw)),
                   raw.decode(errors="replace"))

    @classmethod
    def ping(cls, n_bytes: int = 0) -> "Frame":
        """A link probe carrying ``n_bytes`` of padding; the receiver answers :meth:`pong`."""
        if n_bytes:
            return cls(FrameHeader(FrameKind.PING, DType.BYTES, 0, 0, 0, 0, 0, 0, n_bytes), bytes(n_bytes))
        return cls(FrameHeader(FrameKind.PING, DType.NONE, 0, 0, 0, 0, 0, 0, 0), None)

    @classmethod
    def hello(cls, plan_tag: int) -> "Frame":
        """The first frame on a ring link: the plan (:attr:`Plan.tag`) under which the sender will send."""
        return cls(FrameHeader(FrameKind.HELLO, DType.NONE, plan_tag & 0xFFFFFFFF, 0, 0, 0, 0, 0, 0), None)

    @classmethod
    def pong(cls) -> "Frame":
        return cls(FrameHeader(FrameKind.PONG, DType.NONE, 0, 0, 0, 0, 0, 0, 0), None)

    def encode(self) -> list[bytes | memoryview]:
        """Header and payload buffers, ready for ``writer.writelines``."""
        parts: list[bytes | memoryview] = [self.header.pack()]
        if isinstance(self.payload, np.ndarray):
            parts.append(memoryview(self.payload).cast("B"))
        elif isinstance(self.payload, str):
            parts.append(self.payload.encode()[: self.header.payload_len])
        elif isinstance(self.payload, bytes):
            parts.append(self.payload)
        return parts


def _recv_exact(sock: socket.socket, n: int, allow_eof: bool = False) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if allow_eof and got == 0:
                return None
            raise ConnectionError(f"peer closed the link mid-frame ({got} of {n} bytes)")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> Frame | None:
    """Read one frame from a blocking socket; None at a clean end of stream.

    The header is validated (:meth:`FrameHeader.unpack`) before its payload is
    read; hidden states must be finite (no NaN or ±Inf).

    Raises:
        FrameError: a header or payload that fails validation (the caller drops the link).
        ConnectionError: the peer closed mid-frame.
    """
    raw = _recv_exact(sock, HEADER.size, allow_eof=True)
    if raw is None:
        return None
    header = FrameHeader.unpack(bytes(raw))
    body = _recv_exact(sock, header.payload_len) if header.payload_len else bytearray()
    if header.dtype is DType.TOKENS:
        payload = np.frombuffer(body, dtype="<i4")
    elif header.dtype is DType.F32:
        payload = np.frombuffer(body, dtype="<f4").reshape(header.n_tokens, header.n_embd)
        if not np.isfinite(payload).all():
            raise FrameError("hidden states with NaN or Inf")
    elif header.dtype is DType.TEXT:
        payload = bytes(body).decode(errors="replace")
    elif header.dtype is DType.BYTES:
        payload = bytes(body)
    else:
        payload = None
    return Frame(header, payload)


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
        flags = FLAG_MORE if i + 1 < len(frames) else 0
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


def _handshake_recv(sock: socket.socket, n: int, step: str) -> bytes:
    try:
        return bytes(_recv_exact(sock, n))
    except TimeoutError:
        raise HandshakeError(f"handshake timed out waiting for the {step}") from None
    except (ConnectionError, OSError) as exc:
        raise HandshakeError(f"the peer hung up during the handshake ({step}): {exc}") from None


def _mode(key: ClusterKey | None) -> int:
    return LINK_MODE_OPEN if key is None else LINK_MODE_KEYED


def _check_mode(theirs: int, key: ClusterKey | None) -> None:
    if theirs == _mode(key):
        return
    if theirs == LINK_MODE_KEYED:
        raise HandshakeError("the peer requires a cluster key and none is configured here")
    if theirs == LINK_MODE_OPEN:
        raise HandshakeError("the peer has no cluster key (this end requires one)")
    raise HandshakeError(f"unknown handshake mode {theirs}")


def server_handshake(sock: socket.socket, key: ClusterKey | None,
                     timeout: float = LINK_HANDSHAKE_TIMEOUT_S) -> None:
    """The accepting end's handshake: send a nonce, check the client's MAC, prove ours.

    Each step waits at most ``timeout`` seconds. With ``key`` None the ends
    only check that neither has a key.

    Raises:
        HandshakeError: wrong key, no key on one end, garbage, a timeout, or the peer hung up.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        nonce_s = os.urandom(LINK_NONCE_BYTES)
        try:
            sock.sendall(LINK_HELLO.pack(LINK_MAGIC, LINK_VERSION, _mode(key), nonce_s))
        except OSError as exc:
            raise HandshakeError(f"cannot send the hello: {exc}") from None
        magic, version, mode, nonce_c, mac_c = LINK_REPLY.unpack(_handshake_recv(sock, LINK_REPLY.size, "reply"))
        if magic != LINK_MAGIC or version != LINK_VERSION:
            raise HandshakeError(f"not a homering link (magic {magic!r}, version {version})")
        _check_mode(mode, key)
        mac_s = bytes(32)
        if key is not None:
            if not key.verify(mac_c, LINK_CLIENT_LABEL, nonce_s, nonce_c):
                raise HandshakeError("the peer does not know the cluster key (bad MAC)")
            mac_s = key.mac(LINK_SERVER_LABEL, nonce_c, nonce_s)
        try:
            sock.sendall(LINK_ACCEPT.pack(LINK_ACCEPT_MAGIC, mac_s))
        except OSError as exc:
            raise HandshakeError(f"cannot send the accept: {exc}") from None
    finally:
        sock.settimeout(previous)


def client_handshake(sock: socket.socket, key: ClusterKey | None,
                     timeout: float = LINK_HANDSHAKE_TIMEOUT_S) -> None:
    """The connecting end's handshake: answer the server's nonce with ours and a MAC, check the server's.

    Raises:
        HandshakeError: as :func:`server_handshake`; the server hanging up after
            our reply means it refused our key.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        magic, version, mode, nonce_s = LINK_HELLO.unpack(_handshake_recv(sock, LINK_HELLO.size, "hello"))
        if magic != LINK_MAGIC or version != LINK_VERSION:
            raise HandshakeError(f"not a homering data port (magic {magic!r}, version {version})")
        _check_mode(mode, key)
        nonce_c = os.urandom(LINK_NONCE_BYTES)
        mac_c = key.mac(LINK_CLIENT_LABEL, nonce_s, nonce_c) if key is not None else bytes(32)
        try:
            sock.sendall(LINK_REPLY.pack(LINK_MAGIC, LINK_VERSION, mode, nonce_c, mac_c))
        except OSError as exc:
            raise HandshakeError(f"cannot send the reply: {exc}") from None
        try:
            magic, mac_s = LINK_ACCEPT.unpack(_handshake_recv(sock, LINK_ACCEPT.size, "accept"))
        except HandshakeError as exc:
            raise HandshakeError(f"the peer refused the handshake (another cluster key?): {exc}") from None
        if magic != LINK_ACCEPT_MAGIC:
            raise HandshakeError(f"bad accept magic {magic!r}")
        if key is not None and not key.verify(mac_s, LINK_SERVER_LABEL, nonce_c, nonce_s):
            raise HandshakeError("the peer does not know the cluster key (bad MAC)")
    finally:
        sock.settimeout(previous)


def connect_link(host: str, port: int, *, timeout: float = 30.0, key: ClusterKey | None = None,
                 give_up=None) -> socket.socket:
    """Connect to a neighbour's data port (retrying until ``timeout`` seconds pass) and run the handshake.

    ``give_up()``, when given, is asked before every retry: True stops
    retrying (the plan this link was for has been replaced).

    Returns a blocking socket with TCP_NODELAY, ready for frames.

    Raises:
        HandshakeError: the handshake failed (not retried: another key will not change).
        ConnectionError: the neighbour did not accept in time, or ``give_up()``.
    """
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5.0)
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


def measure_link(host: str, port: int, *, pings: int = 9, probe_bytes: int = 1 << 22,
                 transfers: int = 3, timeout: float = 10.0, key: ClusterKey | None = None) -> tuple[float, float]:
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


class LinkServer:
    """Accepts data-plane links; each link is served by ``handler(sock)`` in its own thread.

    Blocking sockets and threads, not asyncio: a hop then costs one wake-up
    (the receiving thread), and decode runs in that worker thread while the
    asyncio loop serves MQTT. Every link first passes :func:`server_handshake`
    with ``key`` in its own thread; a peer that fails is logged (one line)
    and dropped, and the server keeps accepting.
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

"""The data-plane handshake: both ends of a TCP link prove they hold the same cluster key.

HMAC-SHA256 challenge–response with fresh nonces from both sides, so a recorded
handshake cannot be replayed. Without a key both ends only check that neither has one.

A health check (``homering healthcheck``, the agent container's HEALTHCHECK) sends the 4 bytes
:data:`HEALTH_MAGIC` where a link sends its reply: the server answers :data:`HEALTH_REPLY` and hangs up
without a log line (a failed handshake is logged as a warning). The probe needs no key and learns nothing
but that the data plane accepts and answers.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Literal, overload

from homering.wire.security import ClusterKey

LINK_MAGIC = b"HRNA"
LINK_ACCEPT_MAGIC = b"HRNO"
LINK_VERSION = 1
LINK_MODE_OPEN = 0  # no cluster key: MACs are zero and not checked
LINK_MODE_KEYED = 1  # HMAC-SHA256 with the cluster key
LINK_NONCE_BYTES = 32
LINK_HELLO = struct.Struct("<4sBB32s")
"""Handshake, server → client: magic, version, mode, nonce_s — 38 bytes."""
LINK_REPLY = struct.Struct("<4sBB32s32s")
"""Handshake, client → server: magic, version, mode, nonce_c, mac_c — 70 bytes."""
LINK_ACCEPT = struct.Struct("<4s32s")
"""Handshake, server → client: accept magic, mac_s — 36 bytes."""
LINK_CLIENT_LABEL = b"homering-link-client"
LINK_SERVER_LABEL = b"homering-link-server"
LINK_HANDSHAKE_TIMEOUT_S = 5.0
HEALTH_MAGIC = b"HRNH"
"""Health probe, client → server, in place of the reply — 4 bytes."""
HEALTH_REPLY = struct.Struct("<4sB")
"""Health answer, server → client, after the hello: magic ``HRNH``, status (:data:`HEALTH_SERVING`) — 5 bytes."""
HEALTH_SERVING = 0


class HandshakeError(ConnectionError):
    """A data-plane link whose handshake failed (another cluster key, no key on one end, a timeout, or
    garbage); both ends hang up."""


class HealthProbed(Exception):
    """Raised by :func:`server_handshake` when the peer was a health probe, already answered: hang up quietly."""


@overload
def recv_exact(sock: socket.socket, n: int, allow_eof: Literal[False] = False) -> bytearray: ...
@overload
def recv_exact(sock: socket.socket, n: int, allow_eof: bool) -> bytearray | None: ...
def recv_exact(sock: socket.socket, n: int, allow_eof: bool = False) -> bytearray | None:
    """Exactly ``n`` bytes from ``sock`` (blocking); None when ``allow_eof`` and the peer closed before the first.

    Raises:
        ConnectionError: the peer closed the link part-way.
        TimeoutError, OSError: from the socket.
    """
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


def _handshake_recv(sock: socket.socket, n: int, step: str) -> bytes:
    try:
        return bytes(recv_exact(sock, n))
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


def server_handshake(sock: socket.socket, key: ClusterKey | None, timeout: float = LINK_HANDSHAKE_TIMEOUT_S) -> None:
    """The accepting end's handshake: send a nonce, check the client's MAC, prove ours.

    Each step waits at most ``timeout`` seconds. With ``key`` None the ends
    only check that neither has a key.

    Raises:
        HandshakeError: wrong key, no key on one end, garbage, a timeout, or the peer hung up.
        HealthProbed: the peer was a health probe (:func:`health_probe`), answered: hang up, log nothing.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        nonce_s = os.urandom(LINK_NONCE_BYTES)
        try:
            sock.sendall(LINK_HELLO.pack(LINK_MAGIC, LINK_VERSION, _mode(key), nonce_s))
        except OSError as exc:
            raise HandshakeError(f"cannot send the hello: {exc}") from None
        head = _handshake_recv(sock, len(HEALTH_MAGIC), "reply")
        if head == HEALTH_MAGIC:
            try:
                sock.sendall(HEALTH_REPLY.pack(HEALTH_MAGIC, HEALTH_SERVING))
            except OSError:
                pass  # the probe gave up: it counts the check as failed
            raise HealthProbed
        reply = head + _handshake_recv(sock, LINK_REPLY.size - len(head), "reply")
        magic, version, mode, nonce_c, mac_c = LINK_REPLY.unpack(reply)
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


def client_handshake(sock: socket.socket, key: ClusterKey | None, timeout: float = LINK_HANDSHAKE_TIMEOUT_S) -> None:
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


def health_probe(sock: socket.socket, timeout: float = LINK_HANDSHAKE_TIMEOUT_S) -> None:
    """Ask a data port whether it serves (the connecting end of a health check): send :data:`HEALTH_MAGIC`,
    read the server's hello and its :data:`HEALTH_REPLY`.

    Raises:
        HandshakeError: the port is not a homering data port, did not answer within ``timeout`` seconds per
            step, hung up, or answered another status.
    """
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        try:
            sock.sendall(HEALTH_MAGIC)
        except OSError as exc:
            raise HandshakeError(f"cannot send the health probe: {exc}") from None
        magic, version, _, _ = LINK_HELLO.unpack(_handshake_recv(sock, LINK_HELLO.size, "hello"))
        if magic != LINK_MAGIC or version != LINK_VERSION:
            raise HandshakeError(f"not a homering data port (magic {magic!r}, version {version})")
        magic, status = HEALTH_REPLY.unpack(_handshake_recv(sock, HEALTH_REPLY.size, "health answer"))
        if magic != HEALTH_MAGIC or status != HEALTH_SERVING:
            raise HandshakeError(f"the data port answered the health probe with {magic!r}, status {status}")
    finally:
        sock.settimeout(previous)

"""The cluster key: a shared secret that authenticates data-plane links and signs MQTT orders.

Every process of a cluster (agents, the controller, clients such as ``homering
chat``) loads the same key, from the first of:

1. ``--key-file PATH`` (a command-line option names a *file*; the secret itself
   never appears in argv, which every user of the machine can read with ``ps``);
2. the file named by ``HOMERING_CLUSTER_KEY_FILE``;
3. the secret itself in ``HOMERING_CLUSTER_KEY``.

The secret is text: the file's contents without surrounding whitespace, at
least :data:`MIN_KEY_BYTES` bytes of UTF-8 (``openssl rand -hex 32 > cluster.key``
makes a good one). With no key configured the cluster runs open, as before:
links skip the MAC and messages go unsigned (see
:mod:`homering.wire` for both wire formats). A keyed and a keyless
process do not talk to each other: the link handshake fails on both sides at
once, and signed messages are dropped by keyless receivers and vice versa.

``homering up`` passes the key to the processes it starts through
``HOMERING_CLUSTER_KEY`` in their environment (:func:`child_environment`);
with its embedded broker and no key configured it makes a random one, so its
private cluster is closed to other local users.

Replay: signed *live* messages (generate and cancel jobs, link probes and
their results, client requests, stream events) carry a timestamp and a random
nonce; a receiver accepts one only within :data:`MAX_AGE_S` of its own clock
and only once (:meth:`ClusterKey.accept_once`). Retained state is delivered
late by design, so it is not checked for age: plans and the controller's status
are authenticated; an agent's profile, status and stats are also kept newest
first per agent (:class:`NewestState`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

from homering.errors import HomeringError
from homering.wire.base import MalformedMessage, Message
from homering.wire.messages import AgentState
from homering.wire.topics import parse

M = TypeVar("M", bound=Message)

log = logging.getLogger("homering.security")

ENV_KEY = "HOMERING_CLUSTER_KEY"
ENV_KEY_FILE = "HOMERING_CLUSTER_KEY_FILE"
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 4096
MAX_AGE_S = 120.0
"""Largest difference, seconds, between a live order's timestamp and the receiver's clock (either way):
devices' clocks must agree to within this (NTP)."""
MAX_REMEMBERED = 65536  # nonces of accepted live orders a receiver remembers (the last MAX_AGE_S worth)


class ClusterKey:
    """A loaded cluster key: HMAC-SHA256 with the shared secret, and a memory of nonces already accepted.

    Args:
        secret: the key text (UTF-8, :data:`MIN_KEY_BYTES` … :data:`MAX_KEY_BYTES` bytes).
        source: where it came from, for messages (never the secret).

    Raises:
        HomeringError: a key too short or too long.
    """

    def __init__(self, secret: str, *, source: str = "a key"):
        raw = secret.encode()
        if not MIN_KEY_BYTES <= len(raw) <= MAX_KEY_BYTES:
            raise HomeringError(
                f"the cluster key from {source} has {len(raw)} bytes; it needs "
                f"{MIN_KEY_BYTES} to {MAX_KEY_BYTES} (e.g. 'openssl rand -hex 32')"
            )
        self._secret = raw
        self._text = secret
        self.source = source
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> when it expires (monotonic)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never show the secret
        return f"ClusterKey(from {self.source})"

    @property
    def text(self) -> str:
        """The secret, for a child process's environment only (:func:`child_environment`)."""
        return self._text

    def mac(self, *parts: bytes) -> bytes:
        """HMAC-SHA256 (32 bytes) of ``parts``, each length-prefixed so that no two part lists collide."""
        h = hmac.new(self._secret, digestmod=hashlib.sha256)
        for p in parts:
            h.update(struct.pack(">I", len(p)))
            h.update(p)
        return h.digest()

    def verify(self, tag: bytes, *parts: bytes) -> bool:
        """True when ``tag`` is :meth:`mac` of ``parts`` (constant-time comparison)."""
        return hmac.compare_digest(tag, self.mac(*parts))

    def accept_once(self, nonce: bytes, ts_ms: int, *, now: float | None = None) -> str | None:
        """Admit a live order's (nonce, timestamp) once: None when fresh, else why not.

        ``ts_ms`` is the sender's wall clock in milliseconds; it must lie within
        :data:`MAX_AGE_S` of ours, and ``nonce`` must not have been accepted before
        (nonces are remembered for as long as their order could still pass the age check).
        """
        now = time.time() if now is None else now
        age = now - ts_ms / 1000
        if abs(age) > MAX_AGE_S:
            return (
                f"{'stale' if age > 0 else 'future'} timestamp ({age:+.0f} s; clocks must agree within "
                f"{MAX_AGE_S:.0f} s)"
            )
        mono = time.monotonic()
        with self._lock:
            while self._seen and (next(iter(self._seen.values())) < mono or len(self._seen) >= MAX_REMEMBERED):
                self._seen.popitem(last=False)
            if nonce in self._seen:
                return "replayed (nonce already seen)"
            self._seen[nonce] = mono + 2 * MAX_AGE_S
        return None


KEY_GRACE_S = 5.0
"""How long a keyless client or agent waits for a status it can read once it met a signed one (which may be a
stale retained copy of an earlier keyed cluster on the same broker)."""


class NewestState:
    """A receiver's replay check for an agent's retained state (profile, status, stats): newest wins.

    Retained messages arrive late by design, so they cannot be checked for age as live
    orders are. Instead a signed state message is accepted only when it names the agent
    whose topic it came on and was signed later than the last one accepted of its kind
    from that agent: an old copy replayed later, or one agent's message published on
    another's topic, is refused.

    One exception keeps last-wills working. An agent's will is signed when it connects,
    so it is older than the statuses that follow; an ``offline`` status is therefore
    also accepted when it belongs to the agent's current ``session`` (that of its newest
    accepted status), once per signing time. Unsigned messages (a cluster without a key)
    are all accepted: without a key anyone may publish anything.
    """

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[int, str | None]] = {}  # (kind, agent) -> (ts, session)
        self._wills: dict[str, set[int]] = {}  # agent -> signing times of offline statuses accepted late

    def check(self, topic: str, msg: M) -> M:
        """``msg`` (an ``AgentProfile``/``AgentStatus``/``AgentStats`` from ``homering/agents/<name>/…``) when it
        may be used.

        Raises:
            MalformedMessage: another agent's message on this topic (or a topic of no agent), or one signed
                before the last accepted.
        """
        ts = msg.signed_at
        if ts is None:
            return msg
        ref = parse(topic)
        agent = ref.name if ref is not None and ref.kind != "stream" else None
        kind, name = type(msg).__name__, getattr(msg, "name", None)
        if agent is None:
            raise MalformedMessage(f"{kind} on {topic!r}, which is no agent's topic")
        if name != agent:
            raise MalformedMessage(f"{kind} of agent {name!r} on the topic of {agent!r}")
        last = self._last.get((kind, agent))
        session = getattr(msg, "session", None)
        if last is None or ts > last[0]:
            self._last[(kind, agent)] = (ts, session)
            return msg
        late_will = getattr(msg, "state", None) == AgentState.OFFLINE and session is not None and session == last[1]
        if late_will and ts not in self._wills.setdefault(agent, set()):
            self._wills[agent].add(ts)
            return msg
        raise MalformedMessage(f"{kind} of {agent} signed before the last one accepted (a replay)")


def generate_secret() -> str:
    """A fresh random key: 64 hex digits (256 bits)."""
    return secrets.token_hex(32)


def _read_key_file(path: str, source: str) -> ClusterKey:
    p = Path(path).expanduser()
    try:
        text = p.read_text().strip()
        mode = p.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise HomeringError(f"cannot read the cluster key file {p} ({source}): {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the cluster key file %s is readable by other users: chmod 600 it", p)
    return ClusterKey(text, source=f"{source} {p}")


def load_key(key_file: str | None = None, environ: Mapping[str, str] | None = None) -> ClusterKey | None:
    """The configured cluster key, or None when none is (an open cluster).

    Args:
        key_file: the ``--key-file`` option's value (a path).
        environ: the environment to read [default: ``os.environ``].

    Raises:
        HomeringError: an unreadable key file, or a key of the wrong length.
    """
    env = os.environ if environ is None else environ
    if key_file:
        return _read_key_file(key_file, "--key-file")
    if env.get(ENV_KEY_FILE):
        return _read_key_file(env[ENV_KEY_FILE], ENV_KEY_FILE)
    if env.get(ENV_KEY):
        return ClusterKey(env[ENV_KEY].strip(), source=ENV_KEY)
    return None


def child_environment(key: ClusterKey | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a cluster process this one starts: ours, with exactly ``key`` as its cluster key.

    The key goes in ``HOMERING_CLUSTER_KEY`` (readable only by the same user,
    unlike argv); any inherited key settings are removed, so a child with
    ``key=None`` runs open.
    """
    env = dict(os.environ if environ is None else environ)
    env.pop(ENV_KEY, None)
    env.pop(ENV_KEY_FILE, None)
    if key is not None:
        env[ENV_KEY] = key.text
    return env

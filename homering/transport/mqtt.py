"""MQTT plumbing shared by agents, the controller and clients (aiomqtt).

A broker is a :class:`BrokerURL`, ``mqtt://HOST[:1883]`` or ``mqtts://HOST[:8883]``
(TLS), with optional :class:`BrokerAuth` credentials attached. The credentials
never appear in ``str(url)``, so a URL can be logged, published and passed on
command lines; child processes get the credentials through :meth:`BrokerAuth.env`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlparse

import aiomqtt

from homering.errors import HomeringError
from homering.secrets import read_secret
from homering.tasks import cancelling

log = logging.getLogger("homering.mqtt")

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}

ENV_USER = "HOMERING_MQTT_USER"
ENV_PASSWORD = "HOMERING_MQTT_PASSWORD"
ENV_PASSWORD_FILE = "HOMERING_MQTT_PASSWORD_FILE"
ENV_CA_FILE = "HOMERING_MQTT_CA_FILE"
AUTH_ENV = (ENV_USER, ENV_PASSWORD, ENV_PASSWORD_FILE, ENV_CA_FILE)

# CONNACK codes of a refused login: MQTT 3.1.1 (4, 5) and MQTT 5 (134, 135)
_AUTH_REFUSED = {4, 5, 134, 135}


@dataclass(frozen=True)
class BrokerAuth:
    """Credentials and TLS settings for a broker; empty means anonymous, system CAs.

    Attributes:
        username: the MQTT user name (None: anonymous).
        password: its password (never printed: excluded from ``repr``).
        ca_file: a PEM file of CA certificates to trust for ``mqtts://`` (None: the system's).
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None

    @classmethod
    def load(
        cls,
        username: str | None = None,
        password_file: str | os.PathLike | None = None,
        ca_file: str | os.PathLike | None = None,
        *,
        environ: dict[str, str] | None = None,
    ) -> BrokerAuth:
        """Credentials from options, falling back on the environment.

        ``username`` or ``$HOMERING_MQTT_USER``; the password from
        ``password_file`` or ``$HOMERING_MQTT_PASSWORD_FILE`` (its first line),
        else ``$HOMERING_MQTT_PASSWORD``; ``ca_file`` or ``$HOMERING_MQTT_CA_FILE``.

        Raises:
            HomeringError: an unreadable or empty password file, a missing CA
                file, or a password without a user name.
        """
        env = os.environ if environ is None else environ
        username = username or env.get(ENV_USER) or None
        password_file = password_file or env.get(ENV_PASSWORD_FILE) or None
        ca_file = ca_file or env.get(ENV_CA_FILE) or None
        password = None
        if password_file is not None:
            password = read_secret(password_file, "MQTT password")
        elif env.get(ENV_PASSWORD):
            password = env[ENV_PASSWORD]
        if password is not None and not username:
            raise HomeringError(f"an MQTT password needs a user name (--user or ${ENV_USER})")
        if ca_file is not None and not Path(ca_file).is_file():
            raise HomeringError(f"the CA file {ca_file} does not exist")
        return cls(username, password, str(ca_file) if ca_file is not None else None)

    def env(self) -> dict[str, str]:
        """These settings as ``HOMERING_MQTT_*`` environment variables, for a child process."""
        out = {}
        if self.username:
            out[ENV_USER] = self.username
        if self.password is not None:
            out[ENV_PASSWORD] = self.password
        if self.ca_file:
            out[ENV_CA_FILE] = self.ca_file
        return out

    def __bool__(self) -> bool:
        return bool(self.username or self.password is not None or self.ca_file)


@dataclass(frozen=True)
class BrokerURL:
    """A parsed ``mqtt://HOST:PORT`` or ``mqtts://HOST:PORT`` address, with its credentials.

    ``str()`` gives the address only (no credentials).
    """

    host: str
    port: int
    tls: bool = False
    auth: BrokerAuth = field(default_factory=BrokerAuth, compare=False)

    @classmethod
    def parse(cls, url: str, auth: BrokerAuth | None = None) -> BrokerURL:
        """Parse ``mqtt://host[:port]`` (port 1883 by default) or ``mqtts://host[:port]`` (TLS, 8883).

        Credentials go in ``auth``, not in the URL.

        Raises:
            HomeringError: another scheme, credentials in the URL, no host, a
                bad port, or a CA file for a plain ``mqtt://`` broker.
        """
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in DEFAULT_PORTS:
            raise HomeringError(f"unsupported broker URL {url!r}: use mqtt://HOST:PORT or mqtts://HOST:PORT")
        if parsed.username or parsed.password:
            raise HomeringError("put no credentials in the broker URL: use --user and --password-file")
        if not parsed.hostname:
            raise HomeringError(f"broker URL {url!r} has no host")
        try:
            port = parsed.port or DEFAULT_PORTS[parsed.scheme]
        except ValueError:
            raise HomeringError(f"broker URL {url!r} has a bad port") from None
        auth = auth or BrokerAuth()
        tls = parsed.scheme == "mqtts"
        if auth.ca_file and not tls:
            raise HomeringError("--ca-file goes with an mqtts:// broker URL")
        return cls(parsed.hostname, port, tls, auth)

    def with_auth(self, auth: BrokerAuth) -> BrokerURL:
        """The same broker with other credentials."""
        return replace(self, auth=auth)

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def tls_context(broker: BrokerURL) -> ssl.SSLContext | None:
    """The TLS context for an ``mqtts://`` broker (its CA file, else the system's CAs); None for ``mqtt://``.

    Raises:
        HomeringError: the CA file cannot be loaded.
    """
    if not broker.tls:
        return None
    try:
        return ssl.create_default_context(cafile=broker.auth.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise HomeringError(f"cannot load the CA file {broker.auth.ca_file}: {exc}") from None


class _SocketErrorsAtDebug(logging.Filter):
    """Demote paho-mqtt's "failed to receive on socket: [Errno 32] Broken pipe" (and kin) to DEBUG.

    paho logs a lost connection at ERROR before aiomqtt reports it; homering reports it
    once itself (:func:`keep_connected`'s warning, or :func:`connect_error`), so the
    paho line only doubled it, e.g. on every exit where the broker stops first.
    """

    _PREFIXES = ("failed to receive on socket", "timeout on socket")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and isinstance(record.msg, str) and record.msg.startswith(self._PREFIXES):
            record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_client_log = logging.getLogger("homering.mqtt.client")
"""aiomqtt's and paho-mqtt's own log (instead of their logger ``mqtt``)."""
_client_log.addFilter(_SocketErrorsAtDebug())


class _Client(aiomqtt.Client):
    """aiomqtt's client, leaving no "Future exception was never retrieved" behind.

    aiomqtt (2.5) records an unexpected disconnection as the exception of a private
    future; when the connection breaks while the session is being left (the process
    got SIGTERM or SIGINT as the broker stopped), ``__aexit__`` returns early and
    nobody retrieves it, and asyncio prints a traceback when the future is
    garbage-collected. Leaving the ``async with`` is the end of that connection
    (:func:`keep_connected` reports losses), so its exit marks the exception retrieved.
    """

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            await super().__aexit__(exc_type, exc, tb)
        finally:
            gone = getattr(self, "_disconnected", None)
            if isinstance(gone, asyncio.Future) and gone.done() and not gone.cancelled():
                gone.exception()  # marks it retrieved


def client(
    broker: BrokerURL, *, identifier: str | None = None, will: aiomqtt.Will | None = None, keepalive: int = 10
) -> aiomqtt.Client:
    """An aiomqtt client for ``broker``, logging in with its credentials (use it as ``async with``).

    Its exit never leaves an unretrieved disconnection behind, and paho's socket
    errors log at DEBUG (see :class:`_Client`, :class:`_SocketErrorsAtDebug`).
    """
    return _Client(
        broker.host,
        broker.port,
        identifier=identifier or f"homering-{uuid.uuid4().hex[:8]}",
        will=will,
        keepalive=keepalive,
        username=broker.auth.username,
        password=broker.auth.password,
        tls_context=tls_context(broker),
        logger=_client_log,
    )


def connect_error(broker: BrokerURL, exc: Exception) -> HomeringError:
    """A one-line error for a broker that cannot be reached or refuses the login."""
    rc = getattr(exc, "rc", None)
    code = getattr(rc, "value", rc)
    if isinstance(code, int) and code in _AUTH_REFUSED:
        who = f"user '{broker.auth.username}'" if broker.auth.username else "an anonymous login"
        return HomeringError(f"the MQTT broker at {broker} refused {who}: {exc} (check --user and --password-file)")
    return HomeringError(f"cannot connect to the MQTT broker at {broker}: {exc}")


RECONNECT_MAX_S = 5.0
"""Longest wait between two attempts to reach a broker that went away (the wait doubles from 0.25 s)."""


async def keep_connected(broker: BrokerURL, session, *, identifier: str, will=None, keepalive: int = 10) -> None:
    """Run ``await session(client, reconnected)`` on a connection to ``broker``, again after every loss.

    ``will`` is an ``aiomqtt.Will``, or a function that makes one for each connection
    (a signed will carries the time it was signed: see :class:`~homering.wire.security.NewestState`).

    A lost connection is retried with backoff (0.25 s doubling up to
    :data:`RECONNECT_MAX_S`); ``reconnected`` tells the session to publish
    its retained state again. Runs until cancelled; a connection that breaks while
    the task is being cancelled ends it too (no reconnect, no warning).

    Raises:
        HomeringError: the first connection failed (one line, see :func:`connect_error`).
    """
    backoff, connected_once = 0.25, False
    while True:
        try:
            async with client(
                broker, identifier=identifier, will=will() if callable(will) else will, keepalive=keepalive
            ) as c:
                backoff, reconnected, connected_once = 0.25, connected_once, True
                if reconnected:
                    log.info("reconnected to the broker %s", broker)
                await session(c, reconnected)
        except aiomqtt.MqttError as exc:
            if cancelling():  # stopping (SIGTERM) as the broker went: no reconnect
                raise asyncio.CancelledError() from None
            if not connected_once:
                raise connect_error(broker, exc) from None
            log.warning("lost the broker (%s); reconnecting in %.1f s", exc, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, RECONNECT_MAX_S)

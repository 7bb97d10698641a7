"""The broker a one-machine cluster starts: mosquitto when it is installed, else the embedded amqtt broker.

mosquitto (C) costs far less CPU per message than amqtt (Python), which
matters when the agents, the controller and the broker share a laptop's
cores; amqtt keeps ``homering up`` working where mosquitto is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import pwd
import random
import secrets
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from homering.errors import HomeringError

if TYPE_CHECKING:
    from homering.transport.mqtt import BrokerAuth

log = logging.getLogger("homering.broker")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``, below the kernel's ephemeral range where it can.

    A port from ``bind(0)`` is an ephemeral one, which an outgoing connection may take as its source port
    before the caller binds it (a test's API failed so: "Address already in use"); ports below
    ``ip_local_port_range`` are never handed out that way.
    """
    low = _ephemeral_low()
    for port in random.sample(range(10_000, low), min(50, max(0, low - 10_000))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_low() -> int:
    """The lowest port of Linux's ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``); 10000
    (no port below it is tried) where it cannot be read."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 10_000


def mosquitto_binary() -> str | None:
    """The mosquitto executable, if installed (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )


CLUSTER_USER = "homering"
"""The one MQTT user of a broker that ``homering up`` starts for its own processes."""

# Topics a private cluster's processes use (homering/wire/topics.py, homering/integrations/homeassistant.py).
_ACL = f"user {CLUSTER_USER}\ntopic readwrite homering/#\ntopic readwrite homeassistant/#\n"


def broker_credentials() -> BrokerAuth:
    """Fresh credentials for a private broker: user :data:`CLUSTER_USER`, a random 256-bit password."""
    from homering.transport.mqtt import BrokerAuth

    return BrokerAuth(CLUSTER_USER, secrets.token_urlsafe(32))


def mosquitto_password_hash(password: str, *, iterations: int = 101) -> str:
    """mosquitto's password-file hash (``$7$``: PBKDF2-HMAC-SHA512, 12-byte salt, 64-byte hash, base64).

    The format of mosquitto 2's ``mosquitto_passwd`` (src/password_mosq.c), made here
    so that no extra tool is needed.
    """
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_mosquitto_config(
    folder: Path, host: str, port: int, *, log: bool = False, auth: BrokerAuth | None = None
) -> Path:
    """Write ``mosquitto.conf`` for a broker on ``host:port`` that keeps nothing on disk; returns its path.

    With ``auth`` (a user and password) no anonymous client is accepted: ``passwd`` and an
    ``acl`` (the user may use homering's and Home Assistant's topics, nothing else) are
    written beside it, readable by this user alone. Without it the broker is anonymous
    (the emulated testbed's, inside its own network namespaces).
    """
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"listener {port} {host}", "persistence false", "log_dest stderr" if log else "log_dest none"]
    if auth is None:
        lines.append("allow_anonymous true")
    else:
        user, password = _user_and_password(auth)
        passwd, acl = folder / "passwd", folder / "acl"
        for path, text in ((passwd, f"{user}:{mosquitto_password_hash(password)}\n"), (acl, _ACL)):
            path.touch(mode=0o600)
            path.write_text(text)
        lines += ["allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"]
        lines += _broker_user(folder, passwd, acl)
    conf = folder / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _user_and_password(auth: BrokerAuth) -> tuple[str, str]:
    """The user name and password a broker with ``auth`` accepts.

    Raises:
        HomeringError: either is missing.
    """
    if not auth.username or auth.password is None:
        raise HomeringError("a broker with a user needs its name and a password")
    return auth.username, auth.password


def _broker_user(folder: Path, *files: Path) -> list[str]:
    """mosquitto started by root switches to the user ``mosquitto``: hand it the private files; any other
    user runs it as itself (the ``user`` line then keeps it from switching)."""
    if os.getuid() == 0:
        try:
            owner = pwd.getpwnam("mosquitto")
        except KeyError:
            return ["user root"]
        for path in (folder, *files):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        return []
    return [f"user {pwd.getpwuid(os.getuid()).pw_name}"]


async def run_broker(host: str = "127.0.0.1", port: int = 1883, auth: BrokerAuth | None = None) -> None:
    """Run an amqtt broker (loopback by default) until cancelled.

    With ``auth`` only that user and password may connect (amqtt's ``FileAuthPlugin``, an
    Argon2 hash in a private temporary file); without it the broker is anonymous.
    """
    import tempfile

    from amqtt.broker import Broker

    if not log.isEnabledFor(logging.DEBUG):
        # amqtt logs every half-open probe connection as an error
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="homering-broker-") as folder:
        plugins: dict[str, dict[str, object]]
        if auth is None:
            plugins = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        else:
            user, password = _user_and_password(auth)
            from pwdlib import PasswordHash
            from pwdlib.hashers.argon2 import Argon2Hasher

            passwd = Path(folder) / "passwd"
            passwd.write_text(f"{user}:{PasswordHash((Argon2Hasher(),)).hash(password)}\n")
            plugins = {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwd)}}
        broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}}, "plugins": plugins})
        await broker.start()
        log.info(
            "embedded broker on mqtt://%s:%d (%s)",
            host,
            port,
            "anonymous" if auth is None else f"user {auth.username} only",
        )
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

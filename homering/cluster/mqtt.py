"""MQTT plumbing shared by agents, the controller and clients (aiomqtt)."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import aiomqtt

from homering.errors import HomeringError

log = logging.getLogger("homering.mqtt")

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True)
class BrokerURL:
    """A parsed ``mqtt://HOST:PORT`` address."""

    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> "BrokerURL":
        """Parse ``mqtt://host[:port]`` (port 1883 by default).

        Raises:
            HomeringError: another scheme, or no host.
        """
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme != "mqtt":
            raise HomeringError(f"unsupported broker URL {url!r}: use mqtt://HOST:PORT")
        if not parsed.hostname:
            raise HomeringError(f"broker URL {url!r} has no host")
        try:
            port = parsed.port or 1883
        except ValueError:
            raise HomeringError(f"broker URL {url!r} has a bad port") from None
        return cls(parsed.hostname, port)

    def __str__(self) -> str:
        return f"mqtt://{self.host}:{self.port}"


def client(broker: BrokerURL, *, identifier: str | None = None, will: aiomqtt.Will | None = None,
           keepalive: int = 10) -> aiomqtt.Client:
    """An aiomqtt client for ``broker`` (use it as ``async with``)."""
    return aiomqtt.Client(broker.host, broker.port, identifier=identifier or f"homering-{uuid.uuid4().hex[:8]}",
                          will=will, keepalive=keepalive)


def connect_error(broker: BrokerURL, exc: Exception) -> HomeringError:
    """A one-line error for a broker that cannot be reached."""
    return HomeringError(f"cannot connect to the MQTT broker at {broker}: {exc}")

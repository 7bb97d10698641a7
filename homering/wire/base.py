"""The base of every MQTT message: strict JSON, and the signature trailer (see :mod:`homering.wire`).

A signed payload ends with one more JSON member, ``"_auth":{"ts":TS,"nonce":"N","mac":"M"}``:
HMAC-SHA256 with the cluster key (:class:`~homering.wire.security.ClusterKey`) over the
class name, TS, N and the body. Callers encode and decode through a
:class:`~homering.wire.codec.Codec`, which knows the key; :meth:`Message.load` takes the key
as a required argument, so that no caller can forget it and accept an unsigned message.
"""

from __future__ import annotations

import re
import secrets
import time
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

if TYPE_CHECKING:
    from homering.wire.security import ClusterKey

SCHEMA_VERSION = 1
NAME = r"^[A-Za-z0-9_.-]{1,64}$"
"""The pattern of agent names and request ids (they appear in topics)."""

M = TypeVar("M", bound="Message")


class WireEnum(str, Enum):
    """A string-valued enum of the wire: compares equal to, prints and formats as its value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


AUTH_FIELD = "_auth"
MESSAGE_MAC_LABEL = b"homering-msg-v1"
_AUTH_MARK = b'"' + AUTH_FIELD.encode() + b'":{'

_TRAILER = re.compile(rb'"_auth":\{"ts":(\d{1,15}),"nonce":"([0-9a-f]{32})","mac":"([0-9a-f]{64})"\}\}')


class Message(BaseModel):
    """Base of every MQTT payload: strict fields (no extras, finite numbers), JSON encoded.

    ``SIGNED`` classes carry authority: with a cluster key they are sent
    signed and only accepted signed; ``LIVE`` ones are also checked for age
    and replay (see the module docstring).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/Infinity would reach the planner
    SIGNED: ClassVar[bool] = False
    LIVE: ClassVar[bool] = False
    _signed_at: int | None = PrivateAttr(default=None)

    @property
    def signed_at(self) -> int | None:
        """The sender's clock when it signed this message (ms since the epoch); None when unsigned."""
        return self._signed_at

    def __eq__(self, other: object) -> bool:
        """Equal fields (how a message was signed is no part of its value)."""
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def dump(self, key: ClusterKey | None = None) -> bytes:
        """The payload: the JSON, signed when ``key`` is given and the class is ``SIGNED``.

        An unsigned payload is refused by every receiver that has a key, so forgetting ``key`` fails closed.
        """
        body = self.model_dump_json().encode()
        if key is None or not self.SIGNED:
            return body
        ts = str(int(time.time() * 1000)).encode()
        nonce = secrets.token_hex(16).encode()
        tag = key.mac(MESSAGE_MAC_LABEL, type(self).__name__.encode(), ts, nonce, body).hex().encode()
        trailer = b'"_auth":{"ts":' + ts + b',"nonce":"' + nonce + b'","mac":"' + tag + b'"}}'
        return body[:-1] + (b"," if body != b"{}" else b"") + trailer

    @classmethod
    def load(cls: type[M], payload: bytes | bytearray | str, *, key: ClusterKey | None) -> M:
        """Parse a payload (verifying its signature when ``key`` is given and the class is ``SIGNED``).

        Raises:
            MalformedMessage: anything invalid; :class:`BadSignature` (a subclass) for a
                message that is unsigned, badly signed, stale or replayed when a key is
                configured, or signed when none is.
        """
        try:
            raw = payload.encode() if isinstance(payload, str) else bytes(payload)
        except (UnicodeError, TypeError, ValueError):
            raise MalformedMessage(f"bad {cls.__name__}: not text") from None
        ts = None
        if cls.SIGNED:
            raw, ts = cls._verified(raw, key)
        try:
            msg = cls.model_validate_json(raw)
        except (ValidationError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise MalformedMessage(f"bad {cls.__name__}: {first}") from None
        msg._signed_at = ts
        return msg

    @classmethod
    def _verified(cls, raw: bytes, key: ClusterKey | None) -> tuple[bytes, int | None]:
        """(body, signing time in ms) of a signed payload, checked against ``key``; ``(raw, None)`` when
        keyless and unsigned."""
        at = raw.rfind(_AUTH_MARK)
        m = _TRAILER.fullmatch(raw, at) if at > 0 else None
        before = raw[at - 1 : at] if m else b""
        if m and not (before == b"," or (before == b"{" and at == 1)):
            m = None
        if key is None:
            if m is not None:
                raise MissingKey(f"signed {cls.__name__}, but no cluster key is configured here")
            return raw, None
        if m is None:
            raise BadSignature(f"unsigned {cls.__name__} (this cluster has a key)")
        body = raw[: at - 1] + b"}" if before == b"," else b"{}"
        ts, nonce, tag = m.group(1), m.group(2), bytes.fromhex(m.group(3).decode())
        if not key.verify(tag, MESSAGE_MAC_LABEL, cls.__name__.encode(), ts, nonce, body):
            raise BadSignature(f"bad signature on {cls.__name__}")
        if cls.LIVE:
            why = key.accept_once(nonce, int(ts))
            if why is not None:
                raise BadSignature(f"{cls.__name__} refused: {why}")
        return body, int(ts)


class MalformedMessage(ValueError):
    """A message that does not parse; the receiver logs and drops it."""


class BadSignature(MalformedMessage):
    """A message whose signature is missing, wrong, stale or replayed (or present with no key here)."""


class MissingKey(BadSignature):
    """A signed message where this process has no cluster key: it can never take part in that cluster."""

"""The one way in and out of the wire for MQTT payloads: a :class:`Codec` holds the cluster key.

Every class knows whether it must be signed (``Message.SIGNED``) and whether it is a live
order checked for age and replay (``Message.LIVE``); the codec signs what must be signed
and refuses, on the way in, whatever is unsigned or badly signed when the cluster has a
key, and whatever is signed when it has none. It fails closed: there is no way to decode
a message without saying which key (or None) applies.
"""

from __future__ import annotations

from typing import TypeVar

from homering.wire.base import Message
from homering.wire.security import ClusterKey

M = TypeVar("M", bound=Message)


class Codec:
    """Encodes and decodes :class:`~homering.wire.base.Message` payloads for one cluster.

    ``key`` is the cluster key, or None for a cluster without one (nothing is signed then,
    and signed payloads are refused with :class:`~homering.wire.base.MissingKey`).
    """

    def __init__(self, key: ClusterKey | None) -> None:
        self.key = key

    def encode(self, msg: Message) -> bytes:
        """The payload of ``msg``: its JSON, signed when the cluster has a key and the class is ``SIGNED``."""
        return msg.dump(self.key)

    def decode(self, kind: type[M], payload: bytes | bytearray | str) -> M:
        """Parse and check a payload of class ``kind``.

        Raises:
            MalformedMessage: invalid JSON or fields; :class:`~homering.wire.base.BadSignature` for a
                signature that is missing, wrong, stale or replayed; :class:`~homering.wire.base.MissingKey`
                for a signed payload where this cluster has no key.
        """
        return kind.load(payload, key=self.key)

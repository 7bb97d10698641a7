"""The data plane's binary frames: header, payload, limits, and the plan tag a link starts with.

A frame is a fixed :data:`HEADER` and a raw payload (see :class:`FrameHeader`), validated
before use. Hidden states are float32 (n_tokens × n_embd), token ids int32. Frames that
belong together (one batch) form a group: ``FLAG_MORE`` on all but the last. Socket I/O is
in :mod:`homering.transport.links`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np
import numpy.typing as npt


class FrameKind(IntEnum):
    FORWARD = 1  # run the next window on this payload
    KV_REMOVE = 2  # drop positions >= pos of seq_id in every window, then pass on
    ERROR = 3  # a window failed; payload is a UTF-8 message; goes on to the head
    PING = 4  # link probe: the receiver answers PONG on the same connection
    PONG = 5  # answer to PING (no payload)
    HELLO = 6  # first frame on a ring link: the payload is the sender's plan tag (Plan.tag)


class DType(IntEnum):
    TOKENS = 1  # int32 token ids, n_tokens of them
    F32 = 2  # float32 hidden states, n_tokens × n_embd
    TEXT = 3  # UTF-8 bytes (errors)
    NONE = 4  # no payload
    BYTES = 5  # opaque bytes (PING padding), n_tokens = 0
    TAG = 6  # a uint32 plan tag (HELLO), 4 bytes, n_tokens = 0


FLAG_MORE = 0x01
"""Header flag: another frame of the same group follows; the receiver runs the group as one batch."""
FLAG_ROWS = 0x02
"""Header flag of a FORWARD frame: the head's last window returns the logits of every token, not only the
last one's (a speculative-decoding verification: the last accepted token and its draft tokens)."""

FRAME_MAGIC = b"HRNG"
FRAME_VERSION = 3  # 2: HELLO carries its plan tag as a TAG payload; 3: FLAG_ROWS
HEADER = struct.Struct("<4sBBBBIIHHIIII")
"""magic, version, kind, dtype, flags, request id, seq id, round, reserved (0),
pos, n_tokens, n_embd, payload bytes — 36 bytes."""
MAX_TOKENS_PER_FRAME = 1 << 16  # the controller's --batch is at most this
MAX_EMBD = 1 << 15  # widest hidden state, floats (the largest open models have 16384)
MAX_PAYLOAD = 256 << 20  # largest payload, bytes: n_batch × n_embd × 4 (e.g. 8192 tokens × 8192 floats)
MAX_PROBE_BYTES = 1 << 24  # largest PING padding
MAX_ERROR_BYTES = 4096  # largest ERROR message
MAX_SEQUENCES = 256  # KV sequences a plan may have (Plan.n_parallel)
MAX_POS = (1 << 31) - 1  # llama.cpp positions are int32
TAG_BYTES = 4  # a HELLO's plan tag, uint32 little-endian

_DTYPES = {  # the payload types each frame kind may carry
    FrameKind.FORWARD: (DType.TOKENS, DType.F32),
    FrameKind.KV_REMOVE: (DType.NONE,),
    FrameKind.ERROR: (DType.TEXT,),
    FrameKind.PING: (DType.NONE, DType.BYTES),
    FrameKind.PONG: (DType.NONE,),
    FrameKind.HELLO: (DType.TAG,),
}
DTYPE_SIZE = {DType.TOKENS: 4, DType.F32: 4}  # bytes per element
_PAYLOAD_LIMIT = {DType.NONE: 0, DType.TEXT: MAX_ERROR_BYTES, DType.BYTES: MAX_PROBE_BYTES, DType.TAG: TAG_BYTES}


class FrameError(ValueError):
    """A frame that fails validation; the receiver drops the connection."""


@dataclass(frozen=True)
class FrameHeader:
    """A frame's header (see :data:`HEADER`); ``payload_len`` bytes of payload follow it."""

    kind: FrameKind
    dtype: DType
    request_id: int
    seq_id: int
    round: int
    pos: int
    n_tokens: int
    n_embd: int
    payload_len: int
    flags: int = 0  # FLAG_MORE

    @property
    def more(self) -> bool:
        return bool(self.flags & FLAG_MORE)

    @property
    def rows(self) -> bool:
        """The logits of every token are wanted (:data:`FLAG_ROWS`)."""
        return bool(self.flags & FLAG_ROWS)

    def pack(self) -> bytes:
        return HEADER.pack(
            FRAME_MAGIC,
            FRAME_VERSION,
            self.kind,
            self.dtype,
            self.flags,
            self.request_id,
            self.seq_id,
            self.round,
            0,
            self.pos,
            self.n_tokens,
            self.n_embd,
            self.payload_len,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> FrameHeader:
        """Parse and validate a header (before any payload is read).

        Checks: magic, version, known kind and dtype and their pairing, flags,
        the reserved field, ``seq_id < MAX_SEQUENCES``, positions within int32,
        shape bounds (``1 ≤ n_tokens ≤ MAX_TOKENS_PER_FRAME`` and, for hidden
        states, ``1 ≤ n_embd ≤ MAX_EMBD``; 0 and 0 for other payloads), and that
        ``payload_len`` is exactly ``n_tokens × 4`` (tokens), ``n_tokens × n_embd × 4``
        (hidden states), 0 (none), at most :data:`MAX_ERROR_BYTES` (text) or
        :data:`MAX_PROBE_BYTES` (PING padding), and at most :data:`MAX_PAYLOAD`.

        Raises:
            FrameError: any check fails.
        """
        if len(raw) != HEADER.size:
            raise FrameError(f"short header ({len(raw)} bytes)")
        (magic, version, kind, dtype, flags, request_id, seq_id, rnd, reserved, pos, n_tokens, n_embd, payload_len) = (
            HEADER.unpack(raw)
        )
        if magic != FRAME_MAGIC:
            raise FrameError(f"bad magic {magic!r}")
        if version != FRAME_VERSION:
            raise FrameError(f"unsupported frame version {version}")
        try:
            kind, dtype = FrameKind(kind), DType(dtype)
        except ValueError as exc:
            raise FrameError(str(exc)) from None
        if dtype not in _DTYPES[kind]:
            raise FrameError(f"a {kind.name} frame cannot carry {dtype.name}")
        allowed = FLAG_MORE | (FLAG_ROWS if kind is FrameKind.FORWARD else 0)
        if flags & ~allowed or (flags and kind in (FrameKind.PING, FrameKind.PONG)):
            raise FrameError(f"bad flags {flags:#x} on a {kind.name} frame")
        if reserved:
            raise FrameError(f"reserved header field is {reserved}")
        if seq_id >= MAX_SEQUENCES:
            raise FrameError(f"sequence {seq_id} (at most {MAX_SEQUENCES - 1})")
        if payload_len > MAX_PAYLOAD:
            raise FrameError(f"frame too large ({payload_len} bytes, at most {MAX_PAYLOAD})")
        _check_shape(kind, dtype, pos, n_tokens, n_embd, payload_len)
        return cls(kind, dtype, request_id, seq_id, rnd, pos, n_tokens, n_embd, payload_len, flags)


def _check_shape(kind: FrameKind, dtype: DType, pos: int, n_tokens: int, n_embd: int, payload_len: int) -> None:
    """The shape, positions and payload size checks of :meth:`FrameHeader.unpack`.

    Raises:
        FrameError: any check fails.
    """
    if dtype not in DTYPE_SIZE:
        if n_tokens or n_embd:
            raise FrameError(f"a {dtype.name} frame with a shape ({n_tokens} × {n_embd})")
        limit = _PAYLOAD_LIMIT[dtype]
        if payload_len > limit or (dtype is DType.TAG and payload_len != TAG_BYTES):
            raise FrameError(f"{payload_len} bytes of {dtype.name} on a {kind.name} frame (at most {limit})")
        if pos > MAX_POS:
            raise FrameError(f"position {pos} beyond int32")
        return
    if n_tokens > MAX_TOKENS_PER_FRAME or n_embd > MAX_EMBD:
        raise FrameError(
            f"frame too large ({n_tokens} tokens of {n_embd} floats; at most {MAX_TOKENS_PER_FRAME} of {MAX_EMBD})"
        )
    if n_tokens == 0 or (dtype is DType.F32 and n_embd == 0):
        raise FrameError(f"an empty {dtype.name} frame ({n_tokens} × {n_embd})")
    if dtype is DType.TOKENS and n_embd:
        raise FrameError(f"a token frame with n_embd = {n_embd}")
    expected = n_tokens * (n_embd or 1) * DTYPE_SIZE[dtype]
    if payload_len != expected:
        raise FrameError(f"payload is {payload_len} bytes, header says {expected}")
    if pos > MAX_POS - n_tokens:
        raise FrameError(f"positions {pos} + {n_tokens} beyond int32")


@dataclass
class Frame:
    """A decoded frame: its header and payload (token ids, hidden states, or text)."""

    header: FrameHeader
    payload: npt.NDArray[Any] | str | bytes | None

    @classmethod
    def forward(
        cls, request_id: int, seq_id: int, pos: int, data: npt.NDArray[Any], round: int = 0, *, rows: bool = False
    ) -> Frame:
        """A FORWARD frame: ``data`` is (n,) int32 token ids or (n, n_embd) float32 hidden states; ``rows``
        sets :data:`FLAG_ROWS` (the logits of every token come back)."""
        flags = FLAG_ROWS if rows else 0
        if data.ndim == 1:
            data = np.ascontiguousarray(data, dtype=np.int32)
            header = FrameHeader(
                FrameKind.FORWARD, DType.TOKENS, request_id, seq_id, round, pos, data.shape[0], 0, data.nbytes, flags
            )
        else:
            data = np.ascontiguousarray(data, dtype=np.float32)
            header = FrameHeader(
                FrameKind.FORWARD,
                DType.F32,
                request_id,
                seq_id,
                round,
                pos,
                data.shape[0],
                data.shape[1],
                data.nbytes,
                flags,
            )
        return cls(header, data)

    @classmethod
    def kv_remove(cls, request_id: int, seq_id: int, p0: int) -> Frame:
        """Ask every window in the ring to drop positions >= ``p0`` of ``seq_id``."""
        return cls(FrameHeader(FrameKind.KV_REMOVE, DType.NONE, request_id, seq_id, 0, p0, 0, 0, 0), None)

    @classmethod
    def error(cls, request_id: int, seq_id: int, message: str) -> Frame:
        """Tell the head that a window failed for this request."""
        raw = message.encode()[:MAX_ERROR_BYTES]
        return cls(
            FrameHeader(FrameKind.ERROR, DType.TEXT, request_id, seq_id, 0, 0, 0, 0, len(raw)),
            raw.decode(errors="replace"),
        )

    @classmethod
    def ping(cls, n_bytes: int = 0) -> Frame:
        """A link probe carrying ``n_bytes`` of padding; the receiver answers :meth:`pong`."""
        if n_bytes:
            return cls(FrameHeader(FrameKind.PING, DType.BYTES, 0, 0, 0, 0, 0, 0, n_bytes), bytes(n_bytes))
        return cls(FrameHeader(FrameKind.PING, DType.NONE, 0, 0, 0, 0, 0, 0, 0), None)

    @classmethod
    def hello(cls, plan_tag: int) -> Frame:
        """The first frame on a ring link: the plan (:attr:`Plan.tag`) under which the sender will send."""
        return cls(
            FrameHeader(FrameKind.HELLO, DType.TAG, 0, 0, 0, 0, 0, 0, TAG_BYTES),
            (plan_tag & 0xFFFFFFFF).to_bytes(TAG_BYTES, "little"),
        )

    @property
    def plan_tag(self) -> int | None:
        """The plan tag a HELLO frame carries; None for any other frame."""
        if self.header.kind is FrameKind.HELLO and isinstance(self.payload, bytes):
            return int.from_bytes(self.payload, "little")
        return None

    @classmethod
    def pong(cls) -> Frame:
        return cls(FrameHeader(FrameKind.PONG, DType.NONE, 0, 0, 0, 0, 0, 0, 0), None)

    def encode(self) -> list[bytes | memoryview]:
        """Header and payload buffers, ready for ``writer.writelines``."""
        parts: list[bytes | memoryview] = [self.header.pack()]
        if isinstance(self.payload, np.ndarray):
            parts.append(self.payload.data.cast("B"))
        elif isinstance(self.payload, str):
            parts.append(self.payload.encode()[: self.header.payload_len])
        elif isinstance(self.payload, bytes):
            parts.append(self.payload)
        return parts


def decode_payload(header: FrameHeader, body: bytes | bytearray) -> Frame:
    """The :class:`Frame` of a validated header and its ``header.payload_len`` bytes of payload.

    Raises:
        FrameError: hidden states that are not finite (NaN or ±Inf).
    """
    payload: npt.NDArray[Any] | str | bytes | None
    if header.dtype is DType.TOKENS:
        payload = np.frombuffer(body, dtype="<i4")
    elif header.dtype is DType.F32:
        payload = np.frombuffer(body, dtype="<f4").reshape(header.n_tokens, header.n_embd)
        if not np.isfinite(payload).all():
            raise FrameError("hidden states with NaN or Inf")
    elif header.dtype is DType.TEXT:
        payload = bytes(body).decode(errors="replace")
    elif header.dtype in (DType.BYTES, DType.TAG):
        payload = bytes(body)
    else:
        payload = None
    return Frame(header, payload)

"""Data plane: binary frames of hidden states between ring neighbours over TCP.

A frame is a fixed :data:`homering.cluster.schema.HEADER` and a raw payload
(see :class:`~homering.cluster.schema.FrameHeader`). Links set TCP_NODELAY: a
decode step sends one small frame per hop and must not wait for Nagle.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

import numpy as np

from homering.cluster.schema import HEADER, DType, FrameError, FrameHeader, FrameKind


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
        raw = message.encode()[:4096]
        return cls(FrameHeader(FrameKind.ERROR, DType.TEXT, request_id, seq_id, 0, 0, 0, 0, len(raw)),
                   raw.decode(errors="replace"))

    def encode(self) -> list[bytes | memoryview]:
        """Header and payload buffers, ready for ``writer.writelines``."""
        parts: list[bytes | memoryview] = [self.header.pack()]
        if isinstance(self.payload, np.ndarray):
            parts.append(memoryview(self.payload).cast("B"))
        elif isinstance(self.payload, str):
            parts.append(self.payload.encode()[: self.header.payload_len])
        return parts


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """Read one frame; None at a clean end of stream.

    Raises:
        FrameError: a header that fails validation (the caller drops the link).
        asyncio.IncompleteReadError: the peer closed mid-frame.
    """
    try:
        raw = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise
    header = FrameHeader.unpack(raw)
    body = await reader.readexactly(header.payload_len) if header.payload_len else b""
    if header.dtype is DType.TOKENS:
        payload = np.frombuffer(body, dtype=np.int32)
    elif header.dtype is DType.F32:
        if header.n_embd == 0:
            raise FrameError("hidden-state frame with n_embd = 0")
        payload = np.frombuffer(body, dtype=np.float32).reshape(header.n_tokens, header.n_embd)
    elif header.dtype is DType.TEXT:
        payload = body.decode(errors="replace")
    else:
        payload = None
    return Frame(header, payload)


async def write_frame(writer: asyncio.StreamWriter, frame: Frame) -> None:
    """Send one frame and wait until the kernel has taken it."""
    writer.writelines(frame.encode())
    await writer.drain()


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """Disable Nagle's algorithm on the stream's socket."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def open_link(host: str, port: int, *, timeout: float = 30.0) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a neighbour's data port, retrying until ``timeout`` seconds pass.

    Raises:
        ConnectionError: the neighbour did not accept in time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = 0.05
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, port)
            set_nodelay(writer)
            return reader, writer
        except OSError as exc:
            if loop.time() + delay > deadline:
                raise ConnectionError(f"cannot reach data port {host}:{port}: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

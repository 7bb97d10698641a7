"""The random weights of a synthetic model (:mod:`homering.models.synth`): quantised blocks, generated on the fly.

**Weights.** Every 2-D weight is stored in the chosen quantisation, blocks of
32 values along a row (ggml's ``ne0``), as llama.cpp's ``ggml-common.h``
defines them:

- Q4_0 (ggml type 2), 18 bytes: ``d`` (float16 scale), then 16 bytes of
  nibbles; byte j holds value j in its low nibble and value j + 16 in its high
  nibble; a value is ``(nibble - 8) * d``.
- Q8_0 (ggml type 8), 34 bytes: ``d`` (float16), then 32 ``int8`` quants; a
  value is ``q * d``.

Quants are uniform random bytes; ``|d|`` is chosen so that the weights'
root-mean-square is ``1 / sqrt(fan_in)`` (``fan_in`` = ``ne0``, the row
length), which keeps every projection's output at the scale of its input, so
activations stay finite through all layers and the logits have a standard
deviation of about 1. The sign of ``d`` is random per block (as in real
quantised files, where ``d`` takes the sign of the block's largest value), so
the nonzero mean of the uniform quants (-0.5) does not add up to a bias. Norm
weights are float32 ones.

Generation is deterministic: each tensor is drawn from its own generator,
``np.random.default_rng([seed, crc32(name)])``, so a tensor's bytes depend only
on the seed, its name, its shape and the quantisation (a model with
``n_layers=2`` has the same first two blocks as the full one).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

GGML_TYPE_F32 = 0
Chunk = bytes | npt.NDArray[np.uint8]
"""A piece of a tensor's data as the writer takes it."""
_CHUNK_BYTES = 16 << 20  # bytes generated at a time (peak memory is a small multiple of this)


@dataclass(frozen=True)
class Quant:
    """A block quantisation: ggml type, ``general.file_type``, block layout, quant statistics."""

    name: str
    ggml_type: int
    file_type: int  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
    block_bytes: int  # bytes of one block of 32 values: float16 scale + quants
    quant_rms: float  # root-mean-square of a uniform random quant value, in units of d


QK = 32  # values per block for both types
QUANTS: dict[str, Quant] = {
    # Q4_0: nibbles 0..15 minus 8, uniform: E[v^2] = (16^2 - 1) / 12 + 0.5^2 = 21.5
    "q4_0": Quant("q4_0", 2, 2, 2 + QK // 2, 21.5**0.5),
    # Q8_0: int8 -128..127, uniform: E[v^2] = (256^2 - 1) / 12 + 0.5^2 = 5461.5
    "q8_0": Quant("q8_0", 8, 7, 2 + QK, 5461.5**0.5),
}


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of a synthetic file: its name, dims (ggml order: ``ne0``, the row length, first), ggml type
    and data bytes."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    n_bytes: int


def _f16_bits(x: float) -> int:
    return int(np.array(x, dtype="<f2").view("<u2"))


def _quant_chunks(t: TensorPlan, q: Quant, seed: int) -> Iterator[npt.NDArray[np.uint8]]:
    """The bytes of a random quantised tensor, at most ``_CHUNK_BYTES`` at a time."""
    fan_in = t.dims[0]
    d_bits = _f16_bits(1.0 / (fan_in**0.5) / q.quant_rms)
    lo, hi = d_bits & 0xFF, d_bits >> 8  # little-endian float16; sign bit is bit 7 of the high byte
    bitgen = np.random.default_rng([seed, zlib.crc32(t.name.encode())]).bit_generator
    n_blocks = t.n_bytes // q.block_bytes
    per_chunk = max(1, _CHUNK_BYTES // q.block_bytes)
    for first in range(0, n_blocks, per_chunk):
        nb = min(per_chunk, n_blocks - first)
        n = nb * q.block_bytes
        raw = bitgen.random_raw(-(-n // 8)).view(np.uint8)[:n].reshape(nb, q.block_bytes)
        raw[:, 0] = lo
        raw[:, 1] = (raw[:, 1] & 0x80) | hi  # random sign, fixed magnitude
        yield raw


def _norm_chunks(t: TensorPlan) -> Iterator[bytes]:
    yield np.ones(t.dims, dtype="<f4").tobytes()


def weight_chunks(plan: list[TensorPlan], q: Quant, seed: int) -> Iterator[Chunk]:
    """The data of every tensor of ``plan``, in order: float32 ones for the norms (``GGML_TYPE_F32``), random
    blocks of ``q`` for the rest, at most ``_CHUNK_BYTES`` (16 MiB) at a time."""
    for t in plan:
        yield from (_norm_chunks(t) if t.ggml_type == GGML_TYPE_F32 else _quant_chunks(t, q, seed))


class ReadAhead:
    """The items of an iterator, each made in a worker thread while the caller writes the previous one.

    Random generation and the file write both release the GIL, so they
    overlap (at most two chunks are alive at a time).
    """

    def __init__(self, it: Iterator[Chunk]):
        from concurrent.futures import ThreadPoolExecutor

        self._it = it
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="synth")
        self._next = self._pool.submit(next, it, None)

    def take(self, n_bytes: int) -> Iterator[Chunk]:
        """Items until ``n_bytes`` bytes have been taken (one tensor's worth)."""
        while n_bytes > 0:
            item = self._next.result()
            if item is None:
                return
            self._next = self._pool.submit(next, self._it, None)
            n_bytes -= item.nbytes if isinstance(item, np.ndarray) else len(item)
            yield item

    def close(self) -> None:
        """Stop the worker thread (after the item it is making)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

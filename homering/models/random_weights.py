"""The random weights of a synthetic model (:mod:`homering.models.synth`): quantised blocks, generated on the fly.

**Block types.** Every 2-D weight is stored in ggml blocks along a row
(``ne0``), laid out as llama.cpp's ``ggml-common.h`` defines them:

- Q4_0 (ggml type 2), 18 bytes per 32 values: ``d`` (float16), 16 bytes of
  nibbles; a value is ``(nibble - 8) * d``.
- Q5_0 (type 6), 22 bytes per 32: ``d``, 4 bytes of fifth bits, 16 bytes of
  nibbles; a value is ``(q5 - 16) * d``.
- Q8_0 (type 8), 34 bytes per 32: ``d``, 32 ``int8``; a value is ``q * d``.
- Q4_K (type 12), 144 bytes per 256: ``d`` and ``dmin`` (float16), 12 bytes of
  packed 6-bit sub-block scales and mins, 128 bytes of nibbles; a value is
  ``d * sc * q - dmin * m``. Here every ``sc`` is 8, every ``m`` 15 and
  ``dmin = 4 d``, so a value is ``8 d (q - 7.5)``: centred, like a real block.
- Q6_K (type 14), 210 bytes per 256: 128 bytes of low nibbles, 64 of high
  bits, 16 ``int8`` sub-block scales (all 16 here), then ``d``; a value is
  ``d * sc * (q6 - 32)``.

Quants are uniform random bytes; ``|d|`` is chosen so that the weights'
root-mean-square is ``1 / sqrt(fan_in)`` (``fan_in`` = ``ne0``), which keeps
every projection's output at the scale of its input, so activations stay
finite through all layers and the logits have a standard deviation of about
1 (for ``fan_in`` up to 27648 the smallest ``d`` is about 1e-4, a normal
float16). The sign of ``d`` (and of ``dmin``) is random per block, so a
block's small nonzero mean does not add up to a bias. Norm weights are
float32 ones (Gemma 2's post norms: :data:`POST_NORM_GAIN`); biases (Qwen2's
``attn_q/k/v.bias``) are float32 normal(0, 0.05).

**Mixes.** ``q4_0`` and ``q8_0`` store every weight in that type. ``q4_k_m``
follows llama.cpp's ``LLAMA_FTYPE_MOSTLY_Q4_K_M`` (``llama_tensor_get_type`` in
``src/llama-quant.cpp``, llama.cpp as vendored by llama-cpp-python 0.3.36):
Q4_K everywhere, Q6_K for the output head (the token embedding when tied) and
for ``attn_v`` and ``ffn_down`` of the layers where ``use_more_bits`` holds
(the first and last eighth of the layers and every third one between); a row
length that is not a multiple of 256 falls back to Q5_0 (for Q4_K) or Q8_0
(for Q6_K), as ``tensor_type_fallback`` does. Simplified: mixture-of-experts,
Falcon and 70B special cases (none of the shapes here has them): a MoE's
``ffn_down_exps`` follows ``ffn_down``'s rule, Phi-3's fused ``attn_qkv`` stays
Q4_K (llama.cpp gives it Q5_K) and the 8-expert rule for ``attn_k/v`` (Q8_0) is
left out. A MoE router (``ffn_gate_inp``, float32) is normal(0, 1/sqrt(n_embd)).

Generation is deterministic: each tensor is drawn from its own generator,
``np.random.default_rng([seed, crc32(name)])``, so a tensor's bytes depend only
on the seed, its name, its shape and its type (a model with ``n_layers=2``
has the same first two blocks as the full one, except where ``q4_k_m``'s
layer rule differs).
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
POST_NORM_GAIN = 8.0
"""Gemma 2's post-attention and post-feed-forward norm weights: with ones, the blocks' outputs (rms 1 each)
do not outweigh the token's own embedding (scaled by √n_embd, and tied to the head), and a random model
repeats its input token forever, which would hide a broken split."""
BIAS_STD = 0.05  # standard deviation of the random float32 biases (larger ones make greedy tokens repeat)


@dataclass(frozen=True)
class BlockType:
    """A ggml block quantisation, as far as random blocks need it.

    Attributes:
        name: ggml's name (``q4_k`` …).
        ggml_type: ggml type id.
        block_values: values per block (32 or 256).
        block_bytes: bytes per block.
        d_offset: byte offset of the float16 scale ``d`` in a block.
        value_rms: root-mean-square of a random block's values, in units of ``|d|``.
        fixed_offset: byte offset of ``fixed`` in every block.
        fixed: bytes written at ``fixed_offset`` in every block (sub-block scales), or empty.
        dmin_offset: byte offset of a float16 ``dmin`` set to ``4 d`` (Q4_K), or None.
    """

    name: str
    ggml_type: int
    block_values: int
    block_bytes: int
    d_offset: int
    value_rms: float
    fixed_offset: int = 0
    fixed: bytes = b""
    dmin_offset: int | None = None


# Uniform quants: E[(q - c)^2] = (n^2 - 1) / 12 + (mean - c)^2 for q uniform on 0..n-1.
BLOCKS: dict[str, BlockType] = {
    b.name: b
    for b in (
        BlockType("q4_0", 2, 32, 18, 0, 21.5**0.5),  # nibble - 8: 255/12 + 0.5^2
        BlockType("q5_0", 6, 32, 22, 0, 85.5**0.5),  # q5 - 16: 1023/12 + 0.5^2
        BlockType("q8_0", 8, 32, 34, 0, 5461.5**0.5),  # int8: 65535/12 + 0.5^2
        # 8 (q - 7.5): the 12 scale bytes (at 4) give sc 8 (bytes 0-3, low nibbles of 8-11), m 15 (4-7, high nibbles)
        BlockType("q4_k", 12, 256, 144, 0, 8 * 21.25**0.5, 4, bytes([8] * 4 + [15] * 4 + [0xF8] * 4), 2),
        BlockType("q6_k", 14, 256, 210, 208, 16 * 341.5**0.5, 192, bytes([16] * 16)),  # 16 (q6 - 32)
    )
}
BLOCKS_BY_TYPE = {b.ggml_type: b for b in BLOCKS.values()}


@dataclass(frozen=True)
class Quant:
    """A file's quantisation: the ``general.file_type`` and the block type of each weight.

    Attributes:
        name: ``q4_0``, ``q8_0`` or ``q4_k_m``.
        file_type: llama.cpp's ``LLAMA_FTYPE_MOSTLY_*``.
        base: the block type of most weights.
        k_mix: True for llama.cpp's Q4_K_M rule (Q6_K on some tensors, see the module docstring).
    """

    name: str
    file_type: int
    base: str
    k_mix: bool = False

    def block_for(self, name: str, ne0: int, layer: int | None, n_layers: int) -> BlockType:
        """The block type of weight ``name`` (row length ``ne0``; ``layer`` None outside the blocks).

        ``name`` is the tensor's GGUF name; the tied token embedding is named
        ``output.weight`` here by the caller so that it gets the head's type.
        """
        if not self.k_mix:
            return BLOCKS[self.base]
        more = layer is not None and _use_more_bits(layer, n_layers)
        big = name == "output.weight" or (
            more and name.endswith(("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight"))
        )
        block = BLOCKS["q6_k" if big else "q4_k"]
        if ne0 % block.block_values:
            block = BLOCKS["q8_0" if big else "q5_0"]  # llama.cpp's tensor_type_fallback
        return block


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits`` (``llama-quant.cpp``): layers that Q4_K_M stores with more bits."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


QUANTS: dict[str, Quant] = {
    q.name: q for q in (Quant("q4_0", 2, "q4_0"), Quant("q8_0", 7, "q8_0"), Quant("q4_k_m", 15, "q4_k", True))
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


def _quant_chunks(t: TensorPlan, seed: int) -> Iterator[npt.NDArray[np.uint8]]:
    """The bytes of a random quantised tensor, at most ``_CHUNK_BYTES`` at a time."""
    b = BLOCKS_BY_TYPE[t.ggml_type]
    d = 1.0 / (t.dims[0] ** 0.5) / b.value_rms
    d_bits, dmin_bits = _f16_bits(d), _f16_bits(4 * d)
    bitgen = np.random.default_rng([seed, zlib.crc32(t.name.encode())]).bit_generator
    n_blocks = t.n_bytes // b.block_bytes
    per_chunk = max(1, _CHUNK_BYTES // b.block_bytes)
    fixed = np.frombuffer(b.fixed, dtype=np.uint8)
    for first in range(0, n_blocks, per_chunk):
        nb = min(per_chunk, n_blocks - first)
        n = nb * b.block_bytes
        raw = bitgen.random_raw(-(-n // 8)).view(np.uint8)[:n].reshape(nb, b.block_bytes)
        o = b.d_offset
        sign = raw[:, o + 1] & 0x80  # little-endian float16: the sign is bit 7 of the high byte
        raw[:, o] = d_bits & 0xFF
        raw[:, o + 1] = sign | (d_bits >> 8)  # random sign, fixed magnitude
        if b.dmin_offset is not None:
            raw[:, b.dmin_offset] = dmin_bits & 0xFF
            raw[:, b.dmin_offset + 1] = sign | (dmin_bits >> 8)  # dmin = 4 d, same sign
        if len(fixed):
            raw[:, b.fixed_offset : b.fixed_offset + len(fixed)] = fixed
        yield raw


def _f32_chunks(t: TensorPlan, seed: int) -> Iterator[bytes]:
    if t.name.endswith("ffn_gate_inp.weight"):  # a MoE router: random, or every token would tie on every expert
        rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
        yield rng.normal(0.0, 1.0 / t.dims[0] ** 0.5, t.dims[::-1]).astype("<f4").tobytes()
    elif t.name.endswith(("post_attention_norm.weight", "post_ffw_norm.weight")):
        yield np.full(t.dims, POST_NORM_GAIN, dtype="<f4").tobytes()
    elif t.name.endswith(".bias"):
        rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
        yield rng.normal(0.0, BIAS_STD, t.dims).astype("<f4").tobytes()
    else:
        yield np.ones(t.dims, dtype="<f4").tobytes()


def weight_chunks(plan: list[TensorPlan], seed: int) -> Iterator[Chunk]:
    """The data of every tensor of ``plan``, in order: float32 ones for the norms, random float32 biases,
    random blocks for the quantised weights, at most ``_CHUNK_BYTES`` (16 MiB) at a time."""
    for t in plan:
        yield from (_f32_chunks(t, seed) if t.ggml_type == GGML_TYPE_F32 else _quant_chunks(t, seed))


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

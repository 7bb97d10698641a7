"""Read what homering needs to know about a GGUF file, with clean errors.

Only the header is read (:mod:`homering.models.gguf_file`), so a 70B file
costs nothing to inspect.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from homering.errors import ModelError
from homering.models.gguf_file import read_gguf

_FINGERPRINT_SPAN = 8 << 20  # bytes read from each end of the file


def fingerprint(path: Path) -> str:
    """A cheap model identity: sha256 over the size, the first and the last 8 MiB.

    Hashing a 40 GB file takes minutes; its header (all metadata and tensor
    descriptions) and its tail already differ between any two real models.
    Returns 16 hex digits.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_SPAN))
        if size > _FINGERPRINT_SPAN:
            f.seek(max(_FINGERPRINT_SPAN, size - _FINGERPRINT_SPAN))
            h.update(f.read(_FINGERPRINT_SPAN))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts of a GGUF model.

    Attributes:
        path: the file.
        arch: ``general.architecture`` (``llama``, ``gemma3`` …).
        n_layers: transformer blocks (``<arch>.block_count``).
        n_embd: hidden size, the width of one hidden state in floats.
        n_ctx_train: training context length in tokens.
        name: ``general.name`` or the file stem.
        fingerprint: see :func:`fingerprint`.
        size_bytes: file size.
        layer_bytes: tensor bytes of each block, list of ``n_layers`` ints.
        n_expert: experts per mixture-of-experts layer (``<arch>.expert_count``; 0: dense).
        n_expert_used: experts each token is routed to (``<arch>.expert_used_count``, top-k).
        layer_active_bytes: tensor bytes of each block one token uses: its routed experts' tensors
            (``*_exps``, one matrix per expert) count ``n_expert_used / n_expert`` of their bytes, the rest
            (attention, router, shared experts) all; equal to ``layer_bytes`` for a dense model.
    """

    path: Path
    arch: str
    n_layers: int
    n_embd: int
    n_ctx_train: int
    name: str
    fingerprint: str
    size_bytes: int
    layer_bytes: tuple[int, ...]
    n_expert: int = 0
    n_expert_used: int = 0
    layer_active_bytes: tuple[int, ...] = ()

    @property
    def active_bytes(self) -> int:
        """Bytes of the file one decoded token uses (the file size, less the experts it is not routed to)."""
        return self.size_bytes - sum(self.layer_bytes) + sum(self.layer_active_bytes or self.layer_bytes)


def inspect_gguf(path: str | os.PathLike[str]) -> ModelInfo:
    """Parse and check a GGUF file's header; no tensor data is read.

    Raises:
        ModelError: missing, not GGUF, truncated, or missing the keys a
            decoder-only transformer needs.
    """
    path = Path(path)
    gf = read_gguf(path)
    arch = gf.arch
    if not arch:
        raise ModelError(f"GGUF file has no general.architecture: {path}")
    n_layers = gf.get(f"{arch}.block_count")
    n_embd = gf.get(f"{arch}.embedding_length")
    if not n_layers or not n_embd:
        raise ModelError(f"GGUF file lacks {arch}.block_count or {arch}.embedding_length: {path}")
    layer_bytes = np.zeros(int(n_layers), dtype=np.int64)
    active = np.zeros(int(n_layers), dtype=np.float64)
    n_expert = int(gf.get(f"{arch}.expert_count") or 0)
    used = gf.get(f"{arch}.expert_used_count") or 0
    n_used = int(max(used) if isinstance(used, list) else used)
    for t in gf.tensors:
        blk = block_index(t.name)
        if blk is not None and blk < n_layers:
            layer_bytes[blk] += t.n_bytes
            routed = n_expert and "_exps." in t.name
            active[blk] += t.n_bytes * n_used / n_expert if routed else t.n_bytes
    return ModelInfo(
        path=path,
        arch=str(arch),
        n_layers=int(n_layers),
        n_embd=int(n_embd),
        n_ctx_train=int(gf.get(f"{arch}.context_length") or 0),
        name=str(gf.get("general.name") or path.stem),
        fingerprint=fingerprint(path),
        size_bytes=path.stat().st_size,
        layer_bytes=tuple(int(x) for x in layer_bytes),
        n_expert=n_expert,
        n_expert_used=n_used,
        layer_active_bytes=tuple(int(x) for x in active),
    )


def block_index(tensor_name: str) -> int | None:
    """``blk.<i>.…`` → i; any other tensor name → None."""
    if not tensor_name.startswith("blk."):
        return None
    part = tensor_name.split(".", 2)[1]
    return int(part) if part.isdigit() else None

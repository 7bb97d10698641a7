"""The planner's inputs: the model shape and the measured devices (``cluster.json``).

:class:`ClusterSpec` holds a :class:`ModelShape` (the symbols ``L``, ``b``,
``kv``, ``o``, ``h``, ``c``, ``c_v`` of :mod:`homering.planner.model`) and the
ring's :class:`Device` list; :func:`load_cluster` and :func:`parse_cluster`
validate it, :func:`shape_from_gguf` derives the model shape from a GGUF header
(the KV cache and llama.cpp's compute buffers at a planned context and micro-batch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from homering.errors import HomeringError
from homering.profiler.profile import GpuProfile, OsName

GIB = 1 << 30


class PlanError(HomeringError):
    """The cluster cannot be planned (bad input, or no assignment satisfies the model)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(_Strict):
    """The model inputs of the latency model (``model`` block of ``cluster.json``)."""

    name: str | None = None
    n_layers: int = Field(ge=1, description="L, transformer layers")
    layer_bytes: int = Field(gt=0, description="b, weight bytes of one layer")
    kv_bytes_per_layer: int = Field(ge=0, description="kv, KV-cache bytes of one layer at the planned context")
    output_bytes: int = Field(ge=0, description="o, bytes of the output norm and head")
    hidden_bytes: int = Field(gt=0, description="h, bytes of one hidden state sent per hop")
    compute_bytes: int = Field(
        ge=0, default=0, description="c, compute buffer of one window's context at the planned micro-batch"
    )
    compute_vocab_bytes: int = Field(
        ge=0, default=0, description="c_v, the same for a window that takes tokens or gives logits"
    )
    active_layer_bytes: int | None = Field(
        default=None,
        gt=0,
        description="b_a, weight bytes of one layer a decoded token uses (a MoE: attention, router and its "
        "top-k experts); None: all of b (a dense model)",
    )
    read_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="r, share of a streamed layer's weight bytes a decoded token reads from disk: 1 for a "
        "dense model; for a MoE the pages of the experts it routes to (and the kernel's read-around), as "
        "the profiler measures it (homering.profiler.experts), never assumed",
    )
    hot_share: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="u, share of a layer's weight bytes a stream of decoded tokens keeps coming back to (the "
        "union of the pages they touch): 1 for a dense model, and for a MoE that routes uniformly; smaller for "
        "one whose tokens route to a few experts, as the profiler measures it on real text "
        "(homering.profiler.experts). An overflowing device's page cache must hold only these bytes",
    )
    novel_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="ν, share of the cold layer bytes (those a stream of tokens has not touched) that one more "
        "decoded token reads: experts it had not used; an overflowing device caches none of them. 0 for a dense "
        "model and when not measured; for a MoE as the profiler measures it (homering.profiler.experts)",
    )
    layer_hot_share: list[float] | None = Field(
        default=None,
        description="u of each layer, in layer order (measured on the whole model, where the controller has "
        "it); a device's overflow uses the mean over its layers, Halda's program the mean over all (hot_share)",
    )
    layer_novel_share: list[float] | None = Field(
        default=None, description="ν of each layer, in layer order (as layer_hot_share; novel_share: their mean)"
    )

    @model_validator(mode="after")
    def _per_layer(self) -> ModelShape:
        for name in ("layer_hot_share", "layer_novel_share"):
            values = getattr(self, name)
            if values is not None and (len(values) != self.n_layers or not all(0 <= v <= 1 for v in values)):
                raise ValueError(f"{name} needs one share in [0, 1] per layer ({self.n_layers})")
        return self

    def shares_of(self, layers: list[int] | None = None) -> tuple[float, float]:
        """(u, ν·(1-u)) of a device holding ``layers`` (None: all): the hot share, and the bytes a token reads
        for the first time per byte of those layers; the means of the per-layer figures over them where
        measured, else the model's."""
        idx = range(self.n_layers) if layers is None else layers
        if self.layer_hot_share is None or self.layer_novel_share is None or not idx:
            return self.hot_share, self.novel_share * (1 - self.hot_share)
        u = max(1e-6, sum(self.layer_hot_share[i] for i in idx) / len(idx))
        return u, sum(self.layer_novel_share[i] * (1 - self.layer_hot_share[i]) for i in idx) / len(idx)

    def buffer_bytes(self, k: int, vocab_windows: int) -> int:
        """a = k·c + v·(c_v - c): the compute buffers of a device's k window contexts, ``vocab_windows`` = v
        of them taking tokens or giving logits."""
        return k * self.compute_bytes + vocab_windows * max(0, self.compute_vocab_bytes - self.compute_bytes)

    @staticmethod
    def vocab_windows(k: int, first: bool, head: bool) -> int:
        """v: how many of a device's k windows take tokens (``first``: the first device in use) or give
        logits (``head``); one window that does both (k = 1, the head alone) counts once."""
        return min(k, int(first) + int(head))

    @property
    def head_bytes(self) -> int:
        """The least the head of a ring holds: one layer with its KV cache (b'), its logits window's compute
        buffer (c_v) and the output head (o)."""
        return self.layer_kv_bytes + self.buffer_bytes(1, 1) + self.output_bytes

    @property
    def layer_kv_bytes(self) -> int:
        """b' = b + kv."""
        return self.layer_bytes + self.kv_bytes_per_layer


class Device(_Strict):
    """One device of ``cluster.json``: the measured profile plus ``name`` and ``head``."""

    name: str = Field(min_length=1, max_length=64)
    os: OsName
    ram_gib: float = Field(ge=0)
    disk_gbps: float = Field(gt=0)
    fault_gbps: float | None = Field(
        default=None,
        gt=0,
        description="read speed of page faults on a memory-mapped window, GB/s: how a MoE's overflowing "
        "device reads the experts it lacks (homering.profiler.experts); None: disk_gbps",
    )
    cpu_ms_per_layer: float = Field(gt=0)
    cpu_ms_output: float = Field(ge=0)
    gpu: GpuProfile | None = None
    link_ms: float = Field(ge=0)
    link_mbps: float = Field(gt=0)
    head: bool = False

    @property
    def ram_bytes(self) -> float:
        return self.ram_gib * GIB

    def hop_ms(self, hidden_bytes: int) -> float:
        """Time to send one hidden state to the next device, ms."""
        return self.link_ms + 1000.0 * 8 * hidden_bytes / (self.link_mbps * 1e6)

    def disk_ms(self, n_bytes: float) -> float:
        """Time to read ``n_bytes`` from disk, ms."""
        return 1000.0 * n_bytes / (self.disk_gbps * 1e9)

    def fault_ms(self, n_bytes: float) -> float:
        """Time to read ``n_bytes`` by page faults (a MoE's routed experts, not read in order), ms."""
        return 1000.0 * n_bytes / ((self.fault_gbps or self.disk_gbps) * 1e9)


class ClusterSpec(_Strict):
    """``cluster.json``: ``{"model": {...}, "devices": [...]}``.

    Exactly one device is the head; names are unique.
    """

    source: str | None = None
    notes: list[str] | None = None
    model: ModelShape
    devices: list[Device] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ClusterSpec:
        heads = [d.name for d in self.devices if d.head]
        if len(heads) != 1:
            raise ValueError(
                f"exactly one device must have head=true, found {len(heads)}"
                + (f" ({', '.join(heads)})" if heads else "")
            )
        names = [d.name for d in self.devices]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"device names must be unique: {', '.join(sorted(dup))}")
        return self

    def ring(self) -> list[Device]:
        """Devices in ring order: as listed, with the head moved to the end."""
        return [d for d in self.devices if not d.head] + [d for d in self.devices if d.head]


def load_cluster(path: str | os.PathLike[str], model: ModelShape | None = None) -> ClusterSpec:
    """Read ``cluster.json``; ``model`` (e.g. derived from a GGUF) replaces its model block.

    Raises:
        PlanError: unreadable file, bad JSON, or a field that fails validation;
            the message names the field (``devices.2.ram_gib: …``).
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise PlanError(f"cannot read cluster file {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(raw, dict) and model is not None:
        raw = {**raw, "model": model.model_dump()}
    return parse_cluster(raw, str(path))


def parse_cluster(raw: object, where: str = "cluster") -> ClusterSpec:
    """Validate a cluster dict; raises :class:`PlanError` naming the first bad field."""
    try:
        return ClusterSpec.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise PlanError(f"{where}: {loc + ': ' if loc else ''}{err['msg']}") from None


KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default KV cache type is f16


KV_PAD = 256  # llama.cpp rounds a context's KV cells up to a multiple of this
VOCAB_BYTES_PER_TOKEN = 200
"""llama.cpp's vocabulary tables (token texts, maps, merges) in a window that keeps the tokenizer, per
token: 9.6 MiB for SmolLM2's 49152 tokens, measured as the anonymous memory a model load adds."""


def compute_buffer_bytes(n_batch: int, n_embd: int, n_ff: int, n_kv: int, n_vocab: int | None = None) -> int:
    """llama.cpp's CPU compute buffer of a window context at micro-batch ``n_batch``, bytes (an estimate).

    The graph allocator reuses memory, so the peak is about the widest
    float32 rows live at once for every token of the micro-batch: the
    feed-forward block (``3·n_ff + 4·n_embd``), or, in a window that takes
    tokens or gives logits (pass ``n_vocab``), the logits (``n_vocab +
    2·n_embd``), which llama.cpp reserves for every token; plus the f16
    attention mask over the ``n_kv`` cells. Flash attention (llama.cpp's
    default on the CPU) keeps the attention scores out of it. Checked against
    llama.cpp's reported sizes for SmolLM2 and the synthetic Llama 3.2 3B at
    n_batch 16-256 (within 4%, tests/test_planner.py).
    """
    rows = 3 * n_ff + 4 * n_embd
    if n_vocab:
        rows = max(rows, n_vocab + 2 * n_embd)
    return 4 * n_batch * rows + 2 * n_batch * n_kv


def shape_from_gguf(path: str | os.PathLike[str], n_ctx: int, n_seq: int = 1, n_batch: int = 0) -> ModelShape:
    """The model inputs of the latency model, read from a GGUF header.

    ``layer_bytes`` is the mean weight bytes of a block; ``kv_bytes_per_layer``
    the mean f16 K+V cache of a block at ``n_ctx`` tokens for each of ``n_seq``
    sequences, in llama.cpp's padded cell count (sliding-window layers too: the
    windows keep llama.cpp's full-size SWA cache); ``output_bytes`` is ``output_norm`` plus
    ``output.weight`` (the token embedding when tied); ``hidden_bytes`` is one
    float32 hidden state (``4·n_embd``); ``active_layer_bytes`` the mean
    bytes a token uses of a block of a mixture of experts (``None`` for a
    dense model; ``read_share`` stays 1 until the profilers' figure is set,
    :func:`with_read_share`); ``compute_bytes`` and
    ``compute_vocab_bytes`` come from :func:`compute_buffer_bytes` at
    ``n_batch`` (0: not counted), the latter plus the vocabulary tables
    (:data:`VOCAB_BYTES_PER_TOKEN`) that first and last windows load.

    Raises:
        ModelError: not a usable GGUF file.
        UnsupportedModel: an architecture homering cannot split into layer windows (:mod:`homering.models.support`).
    """
    from homering.models.gguf_file import read_gguf
    from homering.models.gguf_info import block_index, inspect_gguf
    from homering.models.support import check_splittable

    check_splittable(path)

    info = inspect_gguf(path)
    gf = read_gguf(path)
    arch, L = info.arch, info.n_layers

    def per_layer(key: str, default: int) -> list[int]:
        v = gf.get(f"{arch}.{key}", default)
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * L

    n_head = per_layer("attention.head_count", 1)
    n_head_kv = per_layer("attention.head_count_kv", 0)
    n_head_kv = [kv or h for kv, h in zip(n_head_kv, n_head)]
    head_dim = info.n_embd // max(1, n_head[0])
    k_len = int(gf.get(f"{arch}.attention.key_length", head_dim))
    v_len = int(gf.get(f"{arch}.attention.value_length", head_dim))
    cells = -(-n_ctx * n_seq // KV_PAD) * KV_PAD
    kv = sum(cells * n_head_kv[i] * (k_len + v_len) * KV_BYTES_PER_ELEMENT for i in range(L))
    names = {t.name: t.n_bytes for t in gf.tensors if block_index(t.name) is None}
    output = names.get("output_norm.weight", 0) + names.get("output.weight", names.get("token_embd.weight", 0))
    n_ff = max(per_layer("feed_forward_length", 4 * info.n_embd))
    tokens = gf.get("tokenizer.ggml.tokens")
    n_vocab = int(gf.get(f"{arch}.vocab_size", 0) or 0) or (len(tokens) if isinstance(tokens, list) else 0)
    return ModelShape(
        name=info.name,
        n_layers=L,
        layer_bytes=max(1, sum(info.layer_bytes) // L),
        active_layer_bytes=max(1, sum(info.layer_active_bytes) // L) if info.n_expert else None,
        kv_bytes_per_layer=kv // L,
        output_bytes=output,
        hidden_bytes=4 * info.n_embd,
        compute_bytes=compute_buffer_bytes(n_batch, info.n_embd, n_ff, cells),
        compute_vocab_bytes=(
            compute_buffer_bytes(n_batch, info.n_embd, n_ff, cells, n_vocab) + VOCAB_BYTES_PER_TOKEN * n_vocab
        ),
    )


def with_read_share(
    shape: ModelShape,
    shares: list[tuple[float, float, float] | None],
    layers: tuple[Sequence[float], Sequence[float]] | None = None,
) -> ModelShape:
    """``shape`` with the read, hot and novelty shares the devices measured, as ``(r, u, ν)`` (the largest of
    each, the cautious figures), and ``layers``, each layer's ``(u, ν)`` measured on the whole model (two
    sequences of ``n_layers``; :func:`~homering.profiler.device.model_layer_routing`), which replace the
    devices' ``u`` and ``ν`` by their means: for a mixture of experts only; a dense model, or a MoE nothing
    measured, keeps ``r = u = 1``, ``ν = 0``."""
    measured = [s for s in shares if s is not None]
    if shape.active_layer_bytes is None or not (measured or layers):
        return shape
    r, u, v = (min(1.0, max(m[i] for m in measured)) for i in (0, 1, 2)) if measured else (1.0, 1.0, 0.0)
    update: dict[str, object] = {"read_share": r, "hot_share": u, "novel_share": v}
    if layers is not None and len(layers[0]) == len(layers[1]) == shape.n_layers:
        hot, novel = [max(1e-6, min(1.0, x)) for x in layers[0]], [max(0.0, min(1.0, x)) for x in layers[1]]
        update |= {
            "hot_share": sum(hot) / len(hot),
            "novel_share": sum(novel) / len(novel),
            "layer_hot_share": hot,
            "layer_novel_share": novel,
        }
    return shape.model_copy(update=update)

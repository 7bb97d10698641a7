"""The latency model (v1) the planners optimise and report: ms per decoded token.

A plan is ``k`` rounds of ``W = L / k`` layers. In every round each device m in
use runs its window of ``w_m`` layers, ``n_m`` of them on its GPU, then sends
the hidden state on. The model follows PRIMA.CPP (Li et al., arXiv 2504.08791,
§3) with three changes: links cost time, prefetching overlaps disk reads with
the rest of the ring's work (the *stream* mode), and devices are dropped by the
same program that assigns layers.

Symbols (bytes unless noted): ``b`` one layer's weights, ``kv`` one layer's KV
cache at the planned context, ``b' = b + kv``, ``o`` the output norm and head,
``h`` one hidden state per hop, ``c`` llama.cpp's compute buffer of one
window's context at the planned micro-batch, ``c_v`` the same for the windows
that take tokens or give logits (the first and the last: their graphs hold
vocabulary-wide rows).

For device m (ring order = device list, head moved to the end):

- ``comp_m = (w_m - n_m)·cpu_ms_per_layer + n_m·gpu.ms_per_layer``
- ``hop_m = link_ms + 1000·8h / (link_mbps·1e6)`` when two or more devices are
  in use, else 0 (every device in use sends once per round).
- ``s_m = (w_m - n_m)·b'`` (+ ``n_m·b'`` with unified memory): RAM of one window;
  ``a_m = k·c + v_m·(c_v - c)`` the anonymous buffers of its k contexts, where
  ``v_m`` counts its vocabulary windows (the first device in use holds the first
  window, the head the last; with k = 1 a lone head's one window counts once);
  ``need_m = k·s_m + a_m + [head]·o``.
- disk stall per round ``visible_m``, the cheapest open mode:
  *resident* (``need_m <= ram``): 0;
  *overflow*: every token re-reads ``need_m - ram`` (Linux, Android) or all of
  ``need_m`` (macOS), ``visible = 1000·reread / (disk_gbps·1e9) / k``;
  *stream* (open when ``2·s_m + a_m + [head]·o <= ram``):
  ``visible = max(0, 1000·s_m / (disk_gbps·1e9) - slack_m)`` with
  ``slack_m = Σ_{j≠m in use} (comp_j + hop_j)``.

Token latency ``T = k·Σ_{m in use} (comp_m + hop_m + visible_m) + cpu_ms_output(head)``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from homering.profiler.profile import GpuProfile, OsName
from homering.errors import HomeringError

KIB = 1 << 10
GIB = 1 << 30
Mode = Literal["resident", "overflow", "stream"]
MODES: tuple[Mode, ...] = ("resident", "overflow", "stream")


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
    compute_bytes: int = Field(ge=0, default=0,
                               description="c, compute buffer of one window's context at the planned micro-batch")
    compute_vocab_bytes: int = Field(ge=0, default=0,
                                     description="c_v, the same for a window that takes tokens or gives logits")

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
    def layer_kv_bytes(self) -> int:
        """b' = b + kv."""
        return self.layer_bytes + self.kv_bytes_per_layer


class Device(_Strict):
    """One device of ``cluster.json``: the measured profile plus ``name`` and ``head``."""

    name: str = Field(min_length=1, max_length=64)
    os: OsName
    ram_gib: float = Field(ge=0)
    disk_gbps: float = Field(gt=0)
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


class ClusterSpec(_Strict):
    """``cluster.json``: ``{"model": {...}, "devices": [...]}``.

    Exactly one device is the head; names are unique.
    """

    source: str | None = None
    notes: list[str] | None = None
    model: ModelShape
    devices: list[Device] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ClusterSpec":
        heads = [d.name for d in self.devices if d.head]
        if len(heads) != 1:
            raise ValueError(f"exactly one device must have head=true, found {len(heads)}"
                             + (f" ({', '.join(heads)})" if heads else ""))
        names = [d.name for d in self.devices]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"device names must be unique: {', '.join(sorted(dup))}")
        return self

    def ring(self) -> list[Device]:
        """Devices in ring order: as listed, with the head moved to the end."""
        return [d for d in self.devices if not d.head] + [d for d in self.devices if d.head]


def load_cluster(path: str | os.PathLike, model: ModelShape | None = None) -> ClusterSpec:
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


@dataclass(frozen=True)
class DevicePrediction:
    """One device's share of a plan and its predicted cost per token (ms, summed over the k rounds).

    ``compute_ms`` of the head includes ``cpu_ms_output``, so the three columns
    of all devices add up to the token latency.
    """

    name: str
    layers_per_round: int
    gpu_layers_per_round: int
    mode: Mode | None          # None when the device is dropped
    windows: list[tuple[int, int]]
    compute_ms: float
    disk_ms: float
    hop_ms: float

    @property
    def total_ms(self) -> float:
        return self.compute_ms + self.disk_ms + self.hop_ms


@dataclass(frozen=True)
class Prediction:
    """A plan evaluated with the latency model: ``ms_per_token`` = T."""

    k: int
    layers_per_round: int
    ms_per_token: float
    devices: list[DevicePrediction]   # ring order, dropped devices included (mode None)

    @property
    def dropped(self) -> list[str]:
        return [d.name for d in self.devices if d.layers_per_round == 0]

    @property
    def in_use(self) -> list[DevicePrediction]:
        return [d for d in self.devices if d.layers_per_round > 0]


def check_assignment(spec: ClusterSpec, k: int, w: list[int], n: list[int]) -> None:
    """Raise :class:`PlanError` unless (k, w, n) satisfies the model's constraints.

    ``w`` and ``n`` are per device in ring order (:meth:`ClusterSpec.ring`).
    """
    ring, shape = spec.ring(), spec.model
    if k < 1 or shape.n_layers % k:
        raise PlanError(f"k={k} does not divide {shape.n_layers} layers")
    if len(w) != len(ring) or len(n) != len(ring):
        raise PlanError("one w and one n per device")
    W = shape.n_layers // k
    if sum(w) != W:
        raise PlanError(f"layers per round add up to {sum(w)}, not W={W}")
    if w[-1] < 1:
        raise PlanError(f"the head {ring[-1].name} must hold at least one layer per round")
    for d, wm, nm in zip(ring, w, n):
        if not 0 <= nm <= wm:
            raise PlanError(f"{d.name}: need 0 <= n <= w, got n={nm}, w={wm}")
        if nm and d.gpu is None:
            raise PlanError(f"{d.name} has no GPU but n={nm}")
        if d.gpu is not None and k * nm * shape.layer_kv_bytes > d.gpu.vram_gib * GIB:
            raise PlanError(f"{d.name}: {nm} GPU layers x {k} rounds exceed {d.gpu.vram_gib} GiB VRAM")


def evaluate(spec: ClusterSpec, k: int, w: list[int], n: list[int] | None = None) -> Prediction:
    """Evaluate the latency model on an assignment; the reference for every planner.

    Args:
        spec: model shape and devices.
        k: rounds; must divide ``n_layers``.
        w: layers per round of each device, in ring order (head last).
        n: GPU layers per round of each device (default none).

    Each device runs in its cheapest open mode (ties: resident, overflow, stream).

    Raises:
        PlanError: the assignment breaks a constraint (see :func:`check_assignment`).
    """
    ring, shape = spec.ring(), spec.model
    n = list(n) if n is not None else [0] * len(ring)
    w = list(w)
    check_assignment(spec, k, w, n)
    W = shape.n_layers // k
    bp, o, h = shape.layer_kv_bytes, shape.output_bytes, shape.hidden_bytes
    used = [wm > 0 for wm in w]
    multi = sum(used) > 1
    comp = [(wm - nm) * d.cpu_ms_per_layer + (nm * d.gpu.ms_per_layer if nm else 0.0)
            for d, wm, nm in zip(ring, w, n)]
    hop = [d.hop_ms(h) if (u and multi) else 0.0 for d, u in zip(ring, used)]
    busy = sum(c + hp for c, hp in zip(comp, hop))

    starts, pos = [], 0
    for wm in w:
        starts.append(pos)
        pos += wm
    first = used.index(True)
    devices, total = [], 0.0
    for i, (d, wm, nm) in enumerate(zip(ring, w, n)):
        is_head = i == len(ring) - 1
        s = (wm - nm) * bp + (nm * bp if d.gpu is not None and d.gpu.unified else 0)
        buffers = shape.buffer_bytes(k, shape.vocab_windows(k, i == first, is_head))
        need = k * s + buffers + (o if is_head else 0)
        if not used[i]:
            devices.append(DevicePrediction(d.name, 0, 0, None, [], 0.0, 0.0, 0.0))
            continue
        ram = d.ram_bytes
        costs: dict[Mode, float] = {}
        if need <= ram:
            costs["resident"] = 0.0
        reread = need if d.os == "macos" else max(0.0, need - ram)
        costs["overflow"] = d.disk_ms(reread) / k
        if 2 * s + buffers + (o if is_head else 0) <= ram:
            slack = busy - comp[i] - hop[i]
            costs["stream"] = max(0.0, d.disk_ms(s) - slack)
        mode = min(MODES, key=lambda m: (costs.get(m, float("inf")), MODES.index(m)))
        compute = k * comp[i] + (d.cpu_ms_output if is_head else 0.0)
        pred = DevicePrediction(
            name=d.name, layers_per_round=wm, gpu_layers_per_round=nm, mode=mode,
            windows=[(r * W + starts[i], r * W + starts[i] + wm) for r in range(k)],
            compute_ms=compute, disk_ms=k * costs[mode], hop_ms=k * hop[i])
        devices.append(pred)
        total += pred.total_ms
    return Prediction(k=k, layers_per_round=W, ms_per_token=total, devices=devices)


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


def shape_from_gguf(path: str | os.PathLike, n_ctx: int, n_seq: int = 1, n_batch: int = 0) -> ModelShape:
    """The model inputs of the latency model, read from a GGUF header.

    ``layer_bytes`` is the mean weight bytes of a block; ``kv_bytes_per_layer``
    the mean f16 K+V cache of a block at ``n_ctx`` tokens for each of ``n_seq``
    sequences, in llama.cpp's padded cell count (sliding-window layers too: the
    windows keep llama.cpp's full-size SWA cache); ``output_bytes`` is ``output_norm`` plus
    ``output.weight`` (the token embedding when tied); ``hidden_bytes`` is one
    float32 hidden state (``4·n_embd``); ``compute_bytes`` and
    ``compute_vocab_bytes`` come from :func:`compute_buffer_bytes` at
    ``n_batch`` (0: not counted), the latter plus the vocabulary tables
    (:data:`VOCAB_BYTES_PER_TOKEN`) that first and last windows load.

    Raises:
        ModelError: not a usable GGUF file.
    """
    from homering.models.gguf_file import read_gguf
    from homering.models.gguf_info import block_index, inspect_gguf

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
    return ModelShape(name=info.name, n_layers=L, layer_bytes=max(1, sum(info.layer_bytes) // L),
                      kv_bytes_per_layer=kv // L, output_bytes=output, hidden_bytes=4 * info.n_embd,
                      compute_bytes=compute_buffer_bytes(n_batch, info.n_embd, n_ff, cells),
                      compute_vocab_bytes=(compute_buffer_bytes(n_batch, info.n_embd, n_ff, cells, n_vocab)
                                           + VOCAB_BYTES_PER_TOKEN * n_vocab))


def divisors(n: int) -> list[int]:
    """The k that divide ``n`` (ascending)."""
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_rounds(n_layers: int, ks: list[int] | None) -> list[int]:
    """The k to plan for: ``ks`` (sorted, deduplicated) or every divisor of ``n_layers``.

    Raises:
        PlanError: a k that does not divide ``n_layers`` (the message lists the ones that do).
    """
    if not ks:
        return divisors(n_layers)
    for k in sorted(set(ks)):
        if k < 1 or n_layers % k:
            raise PlanError(f"k={k} does not divide {n_layers} layers "
                            f"(choose from {', '.join(map(str, divisors(n_layers)))})")
    return sorted(set(ks))

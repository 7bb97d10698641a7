"""Decode speed of a model's own layers on this device's CPU (and GPU).

The probe runs real layer windows of the model, exactly as an agent does
(:class:`~homering.engine.window.LayerWindow`, hidden-state input):

- ``mid``: :func:`probe_layers` layers from the middle of the model, role
  ``middle`` (hidden states out), and where RAM allows ``mid2``, twice as many
  from the same start → ms per layer = (median(mid2) − median(mid)) / layers,
  without the fixed cost of a decode call (~0.4 ms on a 2-core VM: a third of
  a Qwen3-30B-A3B layer, whose probe has one layer); without ``mid2``,
  median(mid) / layers;
- ``last``/``last-hidden``: the model's last layers as a ``last`` window
  (output norm + vocabulary projection → logits) and as a ``middle`` window
  (hidden states out) → ms of the output = max(0, median(last) − median(last-hidden)).

Each window decodes one token at a time at successive positions (input
shape (1, n_embd) float32); the first :data:`WARMUP_TOKENS` are not timed
(they page the weights in and warm the caches). The windows take turns token
by token, so a burst of background load hits all of them alike; timing stops
early after :data:`TIMING_BUDGET_S` seconds. The windows
are sliced into the normal window cache and reused by later runs.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from homering.engine.window import LayerWindow
from homering.models.gguf_info import ModelInfo, inspect_gguf
from homering.models.slicing import Role, WindowSpec, slice_window
from homering.profiler.memory import cgroup_cpu_quota

log = logging.getLogger(__name__)

PROBE_LAYERS = 4
"""Most layers in a probe window."""
PROBE_WINDOW_BYTES = 512 << 20
"""Tensor bytes a probe window may hold (bytes): big models get fewer layers (at least one)."""
PROBE_N_CTX = 256
"""KV cache size of the probe windows, tokens."""
WARMUP_TOKENS = 4
"""Untimed decodes per window before timing."""
TIMED_TOKENS = 24
"""Timed decodes per window; the median counts."""
TIMING_BUDGET_S = 8.0
"""Seconds of timed decoding after which the probe stops early (with at least
:data:`MIN_TIMED_TOKENS` per window): a machine whose cores are taken by other
work (llama.cpp threads then wait on each other for whole time slices) must
not make profiling take minutes."""
MIN_TIMED_TOKENS = 5


@dataclass(frozen=True)
class ComputeTimings:
    """What :func:`measure_compute` measured.

    Attributes:
        ms_per_layer: median decode time of one token through one more layer, ms (a decode call's fixed
            cost left out where the probe could time two window sizes).
        ms_output: output norm + vocabulary projection of one token, ms
            (None when not measured).
        probe_layers: layers in the probe windows.
        tokens: timed decodes per window (fewer than asked when the time budget ran out).
    """

    ms_per_layer: float
    ms_output: float | None
    probe_layers: int
    tokens: int


def probe_layers(info: ModelInfo) -> int:
    """Layers per probe window: up to :data:`PROBE_LAYERS`, within :data:`PROBE_WINDOW_BYTES`, at least 1."""
    largest = max(info.layer_bytes, default=0) or 1
    return max(1, min(PROBE_LAYERS, info.n_layers, PROBE_WINDOW_BYTES // largest))


PROBE_RAM_FRACTION = 0.5
"""Share of the device's available RAM the probe windows may fill together: they
must stay in the page cache, or the probe would time the disk instead of the CPU."""


def probe_plan(info: ModelInfo, ram_bytes: int | None, output: bool) -> tuple[int, int | None]:
    """(layers of the middle probe window, layers of the output pair or None to estimate the output).

    Three probe windows of n layers (a middle one, then the last n layers
    once with the output and once without: their difference is the output)
    are decoded in turns, so together they must fit in
    :data:`PROBE_RAM_FRACTION` of ``ram_bytes``: n shrinks to fit. When not
    even one layer of each fits with the output, the output is not timed
    (None) and the middle window gets the whole budget. (Several layers, not
    one, where RAM allows: Gemma 3 refuses a window of only a global-attention layer.)
    """
    n = probe_layers(info)
    if ram_bytes is None:
        return n, (n if output else None)
    layer = max(info.layer_bytes, default=0) or 1
    budget = int(PROBE_RAM_FRACTION * ram_bytes)
    if output:
        out_bytes = _head_bytes(info)
        for k in range(n, 0, -1):
            if layer * 3 * k + out_bytes <= budget:
                return k, k
    return max(1, min(n, budget // layer)), None


def _head_bytes(info: ModelInfo) -> int:
    """The bytes beyond the layers (embeddings, output norm and head): an upper bound of the output's."""
    return max(0, info.size_bytes - sum(info.layer_bytes))


WindowSource = Callable[[WindowSpec], Path]
"""Gives the file of a probe window: slices the local model, or downloads it (an agent without the model)."""


def probe_specs(info: ModelInfo, n: int, n_out: int | None, double: bool = False) -> list[WindowSpec]:
    """The probe windows of a :func:`probe_plan` result: a middle window of ``n`` layers from the middle of
    the model; with ``n_out`` the model's last ``n_out`` layers as a ``last`` and a ``middle`` window; with
    ``double`` (and room in the model), last, a middle window of ``2 n`` layers from the same start."""
    L = info.n_layers
    mid_start = (L - n) // 2
    specs = [WindowSpec(mid_start, mid_start + n, Role.MIDDLE)]
    if n_out:
        specs += [WindowSpec(L - n_out, L, Role.LAST), WindowSpec(L - n_out, L, Role.MIDDLE)]
    if double and mid_start + 2 * n <= L:
        specs.append(WindowSpec(mid_start, mid_start + 2 * n, Role.MIDDLE))
    return specs


def doubles(info: ModelInfo, ram_bytes: int | None, n: int, n_out: int | None) -> bool:
    """Whether the ``2 n``-layer middle window fits beside a :func:`probe_plan` result's windows within
    :data:`PROBE_RAM_FRACTION` of ``ram_bytes`` (always, without a RAM figure)."""
    if ram_bytes is None:
        return True
    layer = max(info.layer_bytes, default=0) or 1
    used = layer * n + (layer * 2 * n_out + _head_bytes(info) if n_out else 0)
    return used + layer * 2 * n <= PROBE_RAM_FRACTION * ram_bytes


def possible_probe_specs(info: ModelInfo) -> set[WindowSpec]:
    """Every probe window :func:`measure_compute` may ask for on some device (whatever its RAM), and a MoE's
    :func:`routing_probe_spec`: the only windows a controller slices for agents' profiling."""
    out: set[WindowSpec] = {routing_probe_spec(info)} if info.n_expert else set()
    for n in range(1, probe_layers(info) + 1):
        out.update(probe_specs(info, n, n, double=True))
    return out


def measure_compute(
    model_path: str | Path | None,
    *,
    threads: int,
    gpu: bool = False,
    output: bool = True,
    tokens: int = TIMED_TOKENS,
    warmup: int = WARMUP_TOKENS,
    info: ModelInfo | None = None,
    ram_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
    windows: WindowSource | None = None,
) -> ComputeTimings:
    """Time single-token decode through the model's own layers (see the module docstring).

    Args:
        model_path: the full model's GGUF (None with ``windows`` and ``info``).
        threads: llama.cpp threads (>= 1).
        gpu: offload the probe windows' layers (and output) to the GPU
            (``n_gpu_layers``); only meaningful when llama.cpp has a GPU backend.
        output: also time the output norm + vocabulary projection.
        tokens: timed decodes per window (the median counts), >= 1; fewer
            (at least :data:`MIN_TIMED_TOKENS`) when timing runs over
            :data:`TIMING_BUDGET_S`.
        warmup: untimed decodes before, >= 0; ``warmup + tokens`` must fit
            in :data:`PROBE_N_CTX`.
        info: the model's :func:`~homering.models.gguf_info.inspect_gguf`, if known.
        ram_bytes: RAM available on the device: the probe windows are sized to
            stay in the page cache (:func:`probe_plan`); on a device too small
            for the output pair, ``ms_output`` is estimated from its bytes.
        progress: called with a short status line before each stage.
        windows: where the probe windows come from [default: sliced from ``model_path``].

    Returns:
        :class:`ComputeTimings` (ms; ``ms_output`` None when ``output`` is false).

    Raises:
        ValueError: bad ``threads``/``tokens``/``warmup``.
        ModelError: the model cannot be read or sliced.
        HomeringError: llama.cpp cannot load a probe window or decode fails; ``windows`` failed.
    """
    if threads < 1 or tokens < 1 or warmup < 0 or warmup + tokens > PROBE_N_CTX:
        raise ValueError(f"bad probe settings: threads={threads}, tokens={tokens}, warmup={warmup}")
    say = progress or (lambda _msg: None)
    info = _model_info(model_path) if info is None else info
    n, n_out = probe_plan(info, ram_bytes, output)
    specs = probe_specs(info, n, n_out, doubles(info, ram_bytes, n, n_out))
    say(f"{'slicing' if windows is None else 'getting'} {len(specs)} probe window(s) of {n} layer(s) or more")
    files = _probe_files(model_path, info, specs, windows)
    where = "GPU" if gpu else f"CPU, {threads} thread(s)"
    say(f"timing decode through {n} layer(s) ({where})")
    _warn_if_busy(threads)
    ms = _time_probes(
        files, specs, info.n_embd, threads, n_gpu_layers=(2 * n + 1) if gpu else 0, warmup=warmup, tokens=tokens
    )
    per_layer = _per_layer(ms, n, double=len(specs) > (3 if n_out else 1))
    ms_output = _output_ms(info, ms, per_layer, n_out, output)
    return ComputeTimings(ms_per_layer=per_layer, ms_output=ms_output, probe_layers=n, tokens=len(ms[0]))


def _per_layer(ms: list[list[float]], n: int, *, double: bool) -> float:
    """ms of one more layer: from the ``n``- and ``2 n``-layer windows' medians (the last timings) when
    ``double``, else the ``n``-layer window's median / n. The difference is kept between half and all of the
    latter: a burst of load on one window must not make layers look free or dearer than a whole call."""
    whole = statistics.median(ms[0]) / n
    if not double:
        return whole
    return min(whole, max(0.5 * whole, (statistics.median(ms[-1]) - statistics.median(ms[0])) / n))


def _time_probes(
    files: list[Path],
    specs: list[WindowSpec],
    n_embd: int,
    threads: int,
    *,
    n_gpu_layers: int,
    warmup: int,
    tokens: int,
) -> list[list[float]]:
    """Open the probe windows (``files``, one per spec) and time their decodes (:func:`_time_decodes`)."""
    with ExitStack() as stack:
        opened = [
            stack.enter_context(
                LayerWindow(
                    f,
                    takes_tokens=False,
                    gives_logits=s.role.gives_logits,
                    n_ctx=PROBE_N_CTX,
                    n_batch=1,
                    n_threads=threads,
                    n_gpu_layers=n_gpu_layers,
                )
            )
            for f, s in zip(files, specs)
        ]
        return _time_decodes(opened, n_embd, warmup, tokens, cores=_usable_cores(threads))


def _model_info(model_path: str | Path | None) -> ModelInfo:
    """The model's :func:`~homering.models.gguf_info.inspect_gguf`; ValueError without ``model_path``."""
    if model_path is None:
        raise ValueError("measure_compute needs the model file or its info")
    return inspect_gguf(model_path)


def _probe_files(
    model_path: str | Path | None, info: ModelInfo, specs: list[WindowSpec], windows: WindowSource | None
) -> list[Path]:
    """The probe windows' files: from ``windows``, else sliced from ``model_path``.

    Raises:
        ValueError: neither ``windows`` nor ``model_path``.
    """
    if windows is not None:
        return [windows(s) for s in specs]
    if model_path is None:
        raise ValueError("measure_compute needs the model file or a window source")
    return [slice_window(model_path, s, progress=False, model_fp=info.fingerprint) for s in specs]


def _output_ms(
    info: ModelInfo, ms: list[list[float]], per_layer: float, n_out: int | None, output: bool
) -> float | None:
    """The output's ms from the probe timings (:func:`probe_specs`' order); estimated from its bytes when
    there was no room to time it; None when ``output`` is false."""
    if n_out:
        return max(0.0, statistics.median(ms[1]) - statistics.median(ms[2]))
    if not output:
        return None
    # decode is memory-bound: the head costs its bytes at the layers' rate (a MoE layer's: the bytes it uses)
    out_bytes = _head_bytes(info)
    ms_output = per_layer * out_bytes / (max(info.layer_active_bytes or info.layer_bytes, default=0) or 1)
    log.info("too little RAM to time the output head; estimated %.1f ms from its size", ms_output)
    return ms_output


def _warn_if_busy(threads: int) -> None:
    """Log a warning when other work keeps the cores busy now (the timings will be pessimistic).

    Samples the system-wide CPU use for 0.25 s while this process is idle.
    """
    cores = os.cpu_count() or 1
    busy = psutil.cpu_percent(interval=0.25) / 100.0 * cores
    if busy + threads > cores + 0.5:
        log.warning(
            "the machine is busy (%.1f of %d cores in use by other work, %d profiling threads): "
            "decode timings will be pessimistic",
            busy,
            cores,
            threads,
        )


def _usable_cores(threads: int) -> float | None:
    """Cores the decode threads can use when a cgroup CPU quota caps them below ``threads``, else None."""
    quota = cgroup_cpu_quota()
    return quota if quota is not None and quota < threads else None


def _time_decodes(
    windows: list[LayerWindow], n_embd: int, warmup: int, tokens: int, cores: float | None = None
) -> list[list[float]]:
    """Per window, the ms of each timed single-token decode; the windows take turns.

    With ``cores`` (a cgroup CPU quota below the thread count) a decode's time
    is the process CPU time it used divided by ``cores``: under a quota a short
    decode runs at full speed and the wait for the next period falls between
    decodes, so wall time alone would miss the slowdown a long run sees.
    """
    x = np.random.default_rng(0).standard_normal((1, n_embd), dtype=np.float32)
    samples: list[list[float]] = [[] for _ in windows]
    deadline = None
    for pos in range(warmup + tokens):
        if pos == warmup:
            deadline = time.perf_counter() + TIMING_BUDGET_S
        elif deadline is not None and pos - warmup >= MIN_TIMED_TOKENS and time.perf_counter() > deadline:
            log.warning(
                "decode timing stopped after %d tokens (over %.0f s): the machine is slow or busy",
                pos - warmup,
                TIMING_BUDGET_S,
            )
            break
        for w, s in zip(windows, samples):
            t0, c0 = time.perf_counter(), time.process_time()
            w.forward(x, pos)
            dt = time.perf_counter() - t0
            if cores is not None:
                dt = max(dt, (time.process_time() - c0) / cores)
            if pos >= warmup:
                s.append(dt * 1000.0)
    return samples


def routing_probe_spec(info: ModelInfo) -> WindowSpec:
    """The window a MoE's routing is probed on (:mod:`homering.profiler.experts`): the model's first
    :func:`probe_layers` layers, taking tokens, so real text routes as the model routes it."""
    return WindowSpec(0, probe_layers(info), Role.FIRST)

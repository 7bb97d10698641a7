"""``profile_device``: the :class:`~homering.profiler.profile.DeviceProfile` of this device for a model.

RAM is measured on every call (it is cheap and changes all the time). The
slow figures (disk throughput, CPU/GPU decode times) are cached per (device,
model) as JSON under ``<home>/profiles/``:

- the device key hashes the host name, the process's cgroups
  (``/proc/self/cgroup``: the emulated devices of a test host differ only
  there), the thread count, ``os.cpu_count()`` and the llama-cpp-python version;
- the model key is the model's fingerprint.

Several agents on one machine often start at once. Measuring at the same
time would give garbage on a small machine (they fight over cores and the
disk), so measurement holds an exclusive ``flock`` on ``<home>/profiles/.lock``:
one process measures, the others wait, then find its result in the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ValidationError

from homering import paths
from homering.errors import HomeringError
from homering.models.gguf_info import ModelInfo, inspect_gguf
from homering.profiler.compute import WindowSource, measure_compute
from homering.profiler.disk import DISK_PROBE_BYTES, measure_disk_gbps
from homering.profiler.experts import LayerRouting, measure_layer_routing, measure_model_routing
from homering.profiler.gpu import measure_gpu
from homering.profiler.memory import available_ram_bytes
from homering.profiler.profile import DeviceProfile, GpuProfile, OsName

log = logging.getLogger(__name__)

CACHE_VERSION = 11  # 2: no repacking, CPU quota counted; 3-4: probe windows sized to the RAM; 5: MoE read share;
# 6: MoE hot share, routing probed on real text; 7: MoE novelty share; 8: MoE fault read speed;
# 9: routed experts prefetched; 10: novelty share over the tokens summed; 11: a layer's time without the call's
_GIB = float(1 << 30)


def detect_os() -> OsName:
    """``"android"``, ``"linux"`` or ``"macos"``.

    Android (Termux) reports ``sys.platform == "linux"`` before Python 3.13;
    it is recognised by ``$ANDROID_ROOT`` or ``/system/build.prop``.

    Raises:
        HomeringError: any other platform (homering runs on these three).
    """
    if sys.platform == "android" or (
        sys.platform.startswith("linux") and ("ANDROID_ROOT" in os.environ or Path("/system/build.prop").exists())
    ):
        return "android"
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "darwin":
        return "macos"
    raise HomeringError(f"unsupported platform {sys.platform!r}: homering runs on Linux, Android and macOS")


def _proc_cgroup() -> str:
    try:
        return Path("/proc/self/cgroup").read_text().strip()
    except OSError:
        return ""  # macOS, or hidden (Android SELinux)


def device_key(threads: int) -> str:
    """16 hex digits identifying this device for the profile cache.

    Hashes the host name, ``/proc/self/cgroup``, ``threads``, ``os.cpu_count()``
    and the llama-cpp-python version (another llama.cpp build times differently).
    """
    import llama_cpp

    parts = [socket.gethostname(), _proc_cgroup(), int(threads), os.cpu_count() or 0, llama_cpp.__version__]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


class _CachedTimings(BaseModel):
    """One cache file: the slow figures of a profile (not a wire message)."""

    version: int
    device_key: str
    host: str
    model_fingerprint: str
    threads: int
    disk_gbps: float
    cpu_ms_per_layer: float
    cpu_ms_output: float
    gpu: GpuProfile | None
    profile_ms: float
    measured_at: float  # Unix time, s
    read_share: float | None = None  # a MoE's disk share per token (homering.profiler.experts)
    hot_share: float | None = None  # the share of its layers a stream of tokens touches
    novel_share: float | None = None  # the share of uncached layer bytes one more token reads
    fault_gbps: float | None = None  # the read speed of a cold decode's page faults, GB/s


def profiles_dir() -> Path:
    """Folder of cached profiles (``<home>/profiles``), created on first use."""
    path = paths.home() / "profiles"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _read_cache(path: Path, key: str, fp: str) -> _CachedTimings | None:
    try:
        cached = _CachedTimings.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError, ValueError) as exc:
        log.warning("ignoring unreadable profile cache %s: %s", path, str(exc).splitlines()[0])
        return None
    if cached.version != CACHE_VERSION or cached.device_key != key or cached.model_fingerprint != fp:
        return None
    return cached


def _write_cache(path: Path, record: _CachedTimings) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(record.model_dump_json(indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _measuring_lock(say: Callable[[str], None]) -> Iterator[None]:
    """Exclusive flock on ``<home>/profiles/.lock``; says so when it has to wait."""
    with open(profiles_dir() / ".lock", "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("waiting for another homering process that is profiling this machine")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def profile_device(
    model_path: str | os.PathLike[str] | None,
    *,
    threads: int,
    refresh: bool = False,
    progress: Callable[[str], None] | None = None,
    disk_bytes: int = DISK_PROBE_BYTES,
    disk_dir: str | os.PathLike[str] | None = None,
    info: ModelInfo | None = None,
    windows: WindowSource | None = None,
    routing_tokens: Sequence[int] | None = None,
) -> DeviceProfile:
    """Measure (or read from the cache) this device's profile for one model.

    Measures: RAM available to homering (always, see
    :func:`~homering.profiler.memory.available_ram_bytes`); the window
    cache's disk read throughput (:func:`~homering.profiler.disk.measure_disk_gbps`);
    decode time per layer and of the output head on the CPU
    (:func:`~homering.profiler.compute.measure_compute`); the GPU's free VRAM
    and time per layer when llama.cpp has a GPU backend. ``link_ms`` and
    ``link_mbps`` stay 0 (measured at plan time).

    Args:
        model_path: the model's GGUF (a resolved path; :func:`homering.models.registry.resolve_model`).
        threads: llama.cpp threads to time with (>= 1); part of the cache key.
        refresh: measure again even when the cache has a profile.
        progress: called with a short status line before each stage.
        disk_bytes: size of the disk probe file, bytes (default 1 GiB).
        disk_dir: where to measure the disk; default the window cache folder.
        info: the model's shape, when known (required without ``model_path``).
        windows: where the probe windows come from (required without ``model_path``: an agent
            without the model downloads them, see :mod:`homering.transport.windows`)
            [default: sliced from ``model_path``].
        routing_tokens: a MoE's routing probe text in token ids (:mod:`homering.profiler.experts`), for an
            agent without the model (ModelFacts carry them) [default: tokenized from ``model_path``].

    Returns:
        :class:`DeviceProfile`; ``profile_ms`` is the wall time the measurement
        took, ms, also when the slow figures came from the cache, which
        ``cached`` says (RAM is measured on every call).

    Raises:
        ModelError: the model file is missing or not a usable GGUF.
        HomeringError: unsupported OS, the disk probe failed, llama.cpp
            cannot load or run a probe window.
        ValueError: ``threads`` < 1, or neither ``model_path`` nor ``info`` and ``windows``.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    say = progress or (lambda _msg: None)
    os_name = detect_os()
    model = _model_info(model_path, info, windows)
    key = device_key(threads)
    cache_file = profiles_dir() / f"{key}-{model.fingerprint}.json"

    def measure() -> tuple[int, _CachedTimings]:
        return _measure(cache_file, key, model, threads, say, disk_bytes, disk_dir, windows, routing_tokens)

    ram, record, cached = _cached_or_measured(cache_file, key, model.fingerprint, refresh, say, measure)
    return _profile(os_name, ram, record, cached=cached)


def _model_info(
    model_path: str | os.PathLike[str] | None, info: ModelInfo | None, windows: WindowSource | None
) -> ModelInfo:
    """``info``, else read from ``model_path``; ValueError unless there is a model file, or info and ``windows``."""
    if info is None and model_path is not None:
        info = inspect_gguf(model_path)
    if info is None or (model_path is None and windows is None):
        raise ValueError("profile_device needs the model file, or its info and a window source")
    return info


def _cached_or_measured(
    cache_file: Path,
    key: str,
    fingerprint: str,
    refresh: bool,
    say: Callable[[str], None],
    measure: Callable[[], tuple[int, _CachedTimings]],
) -> tuple[int, _CachedTimings, bool]:
    """(available RAM in bytes, the slow figures, whether they came from the cache).

    The cache's figures unless ``refresh`` (the RAM is measured now); on a miss, ``measure()`` under
    :func:`_measuring_lock`, unless another process wrote the cache while this one waited for the lock.
    """
    cached = None if refresh else _read_cache(cache_file, key, fingerprint)
    if cached is None:
        with _measuring_lock(say):
            # another process may have measured while this one waited
            cached = None if refresh else _read_cache(cache_file, key, fingerprint)
            if cached is None:
                ram, record = measure()
                return ram, record, False
    say("measuring available RAM")
    return available_ram_bytes(), cached, True


def _measure(
    cache_file: Path,
    key: str,
    info: ModelInfo,
    threads: int,
    say: Callable[[str], None],
    disk_bytes: int,
    disk_dir: str | os.PathLike[str] | None,
    windows: WindowSource | None,
    routing_tokens: Sequence[int] | None = None,
) -> tuple[int, _CachedTimings]:
    """Measure the slow figures (and the RAM, last) and write them to ``cache_file`` (a failed write is
    logged); returns (available RAM in bytes, the figures)."""
    t0 = time.perf_counter()
    say(f"measuring disk read throughput ({disk_bytes >> 20} MiB)")
    disk = measure_disk_gbps(disk_dir, size_bytes=disk_bytes)
    cpu = measure_compute(
        info.path, threads=threads, info=info, ram_bytes=available_ram_bytes(), progress=say, windows=windows
    )
    gpu = measure_gpu(info.path, threads=threads, info=info, progress=say, windows=windows)
    routing = None
    if info.n_expert:
        say("measuring the share of a MoE layer a token reads from disk")
        routing = measure_model_routing(info, threads=threads, windows=windows, token_ids=routing_tokens)
    say("measuring available RAM")
    ram = available_ram_bytes()
    record = _CachedTimings(
        version=CACHE_VERSION,
        device_key=key,
        host=socket.gethostname(),
        model_fingerprint=info.fingerprint,
        threads=threads,
        disk_gbps=disk,
        cpu_ms_per_layer=cpu.ms_per_layer,
        cpu_ms_output=cpu.ms_output or 0.0,
        gpu=gpu,
        profile_ms=(time.perf_counter() - t0) * 1000.0,
        measured_at=time.time(),
        read_share=routing.read_share if routing else None,
        hot_share=routing.hot_share if routing else None,
        novel_share=routing.novel_share if routing else None,
        fault_gbps=routing.fault_gbps if routing else None,
    )
    try:
        _write_cache(cache_file, record)
    except OSError as exc:
        log.warning("cannot write the profile cache %s: %s", cache_file, exc)
    return ram, record


def _profile(os_name: OsName, ram_bytes: int, t: _CachedTimings, *, cached: bool) -> DeviceProfile:
    return DeviceProfile(
        os=os_name,
        ram_gib=ram_bytes / _GIB,
        disk_gbps=t.disk_gbps,
        cpu_ms_per_layer=t.cpu_ms_per_layer,
        cpu_ms_output=t.cpu_ms_output,
        gpu=t.gpu,
        model_fingerprint=t.model_fingerprint,
        threads=t.threads,
        profile_ms=t.profile_ms,
        cached=cached,
        read_share=t.read_share,
        hot_share=t.hot_share,
        novel_share=t.novel_share,
        fault_gbps=t.fault_gbps,
    )


LAYER_ROUTING_VERSION = 2


def model_layer_routing(
    info: ModelInfo, *, threads: int, progress: Callable[[str], None] | None = None
) -> LayerRouting | None:
    """Each layer's hot and novelty shares of the MoE model ``info`` (:func:`~homering.profiler.experts.
    measure_layer_routing`, on the whole model: the controller's, which has the file), cached per model as
    ``<home>/profiles/routing-<fingerprint>.json`` and measured under the profiling lock; None for a dense
    model, or where it cannot be measured (not Linux).

    Raises:
        HomeringError: llama.cpp cannot load the model or decode fails.
    """
    if not info.n_expert:
        return None
    cache_file = profiles_dir() / f"routing-{info.fingerprint}.json"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("version") == LAYER_ROUTING_VERSION and len(cached["hot_share"]) == info.n_layers:
            return LayerRouting(tuple(cached["hot_share"]), tuple(cached["novel_share"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    say = progress or (lambda _msg: None)
    with _measuring_lock(say):
        say(f"measuring how {info.path.name} routes its tokens, layer by layer (once per model)")
        routing = measure_layer_routing(info.path, threads=threads)
    if routing is not None and len(routing.hot_share) == info.n_layers:
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": LAYER_ROUTING_VERSION, **routing.to_json()}))
        os.replace(tmp, cache_file)
    return routing

"""The device's GPU as llama.cpp sees it: free VRAM (ggml's backend device API) and decode speed per layer."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from homering.models.gguf_info import ModelInfo
from homering.profiler.compute import WindowSource, measure_compute
from homering.profiler.profile import GpuProfile

log = logging.getLogger(__name__)

_GGML_DEV_GPU = 1  # enum ggml_backend_dev_type (ggml-backend.h): CPU, GPU, IGPU, ACCEL, META
_GGML_DEV_IGPU = 2


def gpu_free_vram() -> tuple[int, bool] | None:
    """Free memory of llama.cpp's GPU devices: (bytes summed over GPUs, any of them integrated).

    Uses the ggml backend device API (``ggml_backend_dev_count``,
    ``ggml_backend_dev_type``, ``ggml_backend_dev_memory``) from libggml
    through ctypes. Integrated GPUs (``GGML_BACKEND_DEVICE_TYPE_IGPU``) use
    system RAM.

    Returns:
        None when the API is not exported or llama.cpp has no GPU device
        (an RPC-only build, for instance). Never raises.
    """
    import ctypes

    import llama_cpp
    from llama_cpp import _ggml

    try:
        llama_cpp.llama_supports_gpu_offload()  # loads dynamic backends if none is loaded yet
        lib = _ggml.libggml
        # lib[...] makes fresh function objects: the shared ones keep their own argtypes
        dev_count, dev_get, dev_type, dev_memory = (
            lib[n]
            for n in (
                "ggml_backend_dev_count",
                "ggml_backend_dev_get",
                "ggml_backend_dev_type",
                "ggml_backend_dev_memory",
            )
        )
    except (AttributeError, OSError) as exc:
        log.warning("cannot query free VRAM (ggml backend device API: %s)", exc)
        return None
    dev_count.argtypes, dev_count.restype = [], ctypes.c_size_t
    dev_get.argtypes, dev_get.restype = [ctypes.c_size_t], ctypes.c_void_p
    dev_type.argtypes, dev_type.restype = [ctypes.c_void_p], ctypes.c_int
    dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    dev_memory.restype = None
    free_total, integrated, found = 0, False, False
    for i in range(dev_count()):
        dev = dev_get(i)
        kind = dev_type(dev)
        if kind not in (_GGML_DEV_GPU, _GGML_DEV_IGPU):
            continue
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        free_total += free.value
        integrated |= kind == _GGML_DEV_IGPU
        found = True
    return (free_total, integrated) if found else None


def measure_gpu(
    model_path: str | Path | None,
    *,
    threads: int,
    info: ModelInfo | None = None,
    progress: Callable[[str], None] | None = None,
    windows: WindowSource | None = None,
) -> GpuProfile | None:
    """The device's GPU profile, or None when llama.cpp offers no GPU.

    ``vram_gib``: free VRAM (:func:`gpu_free_vram`), GiB; ``ms_per_layer``:
    :func:`measure_compute` with the probe layers offloaded; ``unified``:
    macOS (Metal) or an integrated GPU.

    Returns:
        None without ``llama_supports_gpu_offload()``, or when free VRAM
        cannot be read (a warning is logged).

    Raises:
        the errors of :func:`measure_compute`.
    """
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return None
    vram = gpu_free_vram()
    if vram is None:
        log.warning("llama.cpp supports GPU offload but reports no GPU memory: profiling the CPU only")
        return None
    free, integrated = vram
    timings = measure_compute(
        model_path, threads=threads, gpu=True, output=False, info=info, progress=progress, windows=windows
    )
    return GpuProfile(
        vram_gib=free / (1 << 30), ms_per_layer=timings.ms_per_layer, unified=sys.platform == "darwin" or integrated
    )

"""The device profiler: what the planner needs to know about one device for one model.

PRIMA.CPP's planner (Halda) works from a profile of every device: memory it
may use, disk read speed (for weights that do not stay in RAM), compute time
per layer on the CPU and the GPU, and the output head's time. This package
measures them on the real model (:func:`profile_device`), caches the slow
figures per (device, model), and fills a
:class:`~homering.profiler.profile.DeviceProfile` that ``homering profile``
prints and the agent publishes.

Modules: :mod:`.memory` (RAM and cgroup limits), :mod:`.disk` (read
throughput), :mod:`.compute` (CPU/GPU decode timings), :mod:`.gpu` (free
VRAM and the GPU's profile), :mod:`.device` (the cache and :func:`profile_device`).
"""

from homering.profiler.compute import ComputeTimings, measure_compute
from homering.profiler.device import detect_os, device_key, profile_device, profiles_dir
from homering.profiler.disk import DISK_PROBE_BYTES, measure_disk_gbps
from homering.profiler.gpu import gpu_free_vram, measure_gpu
from homering.profiler.memory import AGENT_RESERVE_BYTES, available_ram_bytes, cgroup_memory_headroom

__all__ = [
    "AGENT_RESERVE_BYTES",
    "DISK_PROBE_BYTES",
    "ComputeTimings",
    "available_ram_bytes",
    "cgroup_memory_headroom",
    "detect_os",
    "device_key",
    "gpu_free_vram",
    "measure_compute",
    "measure_disk_gbps",
    "measure_gpu",
    "profile_device",
    "profiles_dir",
]

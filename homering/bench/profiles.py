"""Device profiles measured one device at a time, alone on the host, before a testbed benchmark's runs.

On a testbed every emulated device shares the host's cores. When a cluster starts, each agent profiles its
device (:func:`homering.profiler.profile_device`, serialised by the profile lock) while the other agents
and the controller load, hash and slice: the probe then shares its core and times layers slower than the
device runs them. Measured on the 2-core VM of the results, Qwen3-30B-A3B on home4-32b's D3: 3.17 ms per
layer profiled at a cluster's start, 2.16 profiled alone, ~2.35 in the run that followed (with its hops and
reads). Real devices are separate machines and never see this. So a benchmark first runs ``homering profile``
in each device's cgroups and namespace, one after the other with nothing else running, into the device's
own home: the agents then find their profile cached (same device key, same model) and measure nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from homering.errors import HomeringError

PROFILE_TIMEOUT_S = 1800.0
"""The longest one device's profile may take, s (a 32B model's probe windows on a slow emulated disk)."""


def profile_devices_alone(tb, model_path: Path, *, threads: int, console: Console) -> dict[str, dict]:
    """Profile every device of testbed ``tb`` for ``model_path`` with ``threads`` llama.cpp threads (the
    agents' own), one at a time; a device whose profile is cached is not measured again. Returns per device
    ``cpu_ms_per_layer`` (ms) and whether it came from the cache (``cached``).

    Raises:
        HomeringError: a device's profile failed or timed out (its log names the cause).
    """
    out: dict[str, dict] = {}
    for dev in tb.devices:
        log_path = tb.log_path(f"profile-{dev}")
        argv = [sys.executable, "-m", "homering", "-q", "profile", "-m", str(model_path), "-t", str(threads), "--json"]
        with open(log_path, "ab") as log:
            proc = tb.spawn(dev, argv, stdout=subprocess.PIPE, stderr=log)
            try:
                stdout, _ = proc.communicate(timeout=PROFILE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise HomeringError(f"profiling {dev} took over {PROFILE_TIMEOUT_S:.0f} s: see {log_path}") from None
        if proc.returncode != 0:
            raise HomeringError(f"profiling {dev} failed (exit {proc.returncode}): see {log_path}")
        prof = json.loads(stdout)
        out[dev] = {"cpu_ms_per_layer": prof["cpu_ms_per_layer"], "cached": bool(prof.get("cached"))}
        how = "cached" if out[dev]["cached"] else "measured alone"
        console.print(f"  profile of {dev}: {prof['cpu_ms_per_layer']:.2f} ms per layer ({how})")
    return out

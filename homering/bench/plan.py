"""``homering bench plan``: Halda's solve time on random heterogeneous home clusters.

Each cluster mixes phones, laptops, Macs and GPU desktops with random RAM,
disk, CPU and link figures around typical values, for a Llama-3-70B Q4_K
shaped model (80 layers of 513 MB, see ``examples/clusters/prima-home4.json``).
Halda solves one program per divisor k of the layer count; the time reported
covers all of them.
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from homering.bench import write_json
from homering.planner.halda import solve
from homering.planner.model import ClusterSpec, ModelShape, parse_cluster

LLAMA3_70B_Q4K = ModelShape(
    name="llama3-70b-q4_k",
    n_layers=80,
    layer_bytes=513_245_184,
    kv_bytes_per_layer=16_777_216,
    output_bytes=861_913_088,
    hidden_bytes=32_768,
)


def random_cluster(n_devices: int, rng: random.Random, shape: ModelShape = LLAMA3_70B_Q4K) -> ClusterSpec:
    """A random home cluster of ``n_devices`` (the first one is the head)."""
    devices = []
    for i in range(n_devices):
        kind = rng.choice(["phone", "laptop", "mac", "desktop"])
        gpu = None
        if kind == "phone":
            os_name, ram, disk, cpu = "android", rng.uniform(1, 4), rng.uniform(0.8, 1.6), rng.uniform(25, 45)
        elif kind == "mac":
            os_name, ram, disk, cpu = "macos", rng.uniform(2, 12), rng.uniform(0.6, 3), rng.uniform(10, 20)
            gpu = {"vram_gib": ram, "ms_per_layer": rng.uniform(6, 12), "unified": True}
        elif kind == "laptop":
            os_name, ram, disk, cpu = "linux", rng.uniform(3, 12), rng.uniform(1.5, 3.5), rng.uniform(14, 25)
            if rng.random() < 0.5:
                gpu = {"vram_gib": rng.choice([4, 6, 8]), "ms_per_layer": rng.uniform(1.8, 3), "unified": False}
        else:
            os_name, ram, disk, cpu = "linux", rng.uniform(6, 24), rng.uniform(2, 6), rng.uniform(10, 18)
            gpu = {"vram_gib": rng.choice([8, 11, 12, 16, 24]), "ms_per_layer": rng.uniform(1, 2), "unified": False}
        devices.append(
            {
                "name": f"{kind}-{i}",
                "os": os_name,
                "ram_gib": round(ram, 2),
                "disk_gbps": round(disk, 2),
                "cpu_ms_per_layer": round(cpu, 2),
                "cpu_ms_output": round(cpu * 1.7, 2),
                "gpu": gpu,
                "link_ms": round(rng.uniform(2, 8), 2),
                "link_mbps": round(rng.uniform(150, 700)),
                "head": i == 0,
            }
        )
    return parse_cluster({"model": shape.model_dump(), "devices": devices})


def run_plan_bench(
    device_counts: list[int],
    *,
    n_layers: int = 80,
    repeats: int = 3,
    seed: int = 0,
    out: str | Path = "bench-results/plan.json",
    console: Console | None = None,
) -> dict:
    """Solve ``repeats`` random clusters per size; print a table and write JSON to ``out``."""
    console = console or Console()
    shape = LLAMA3_70B_Q4K.model_copy(update={"n_layers": n_layers})
    rng = random.Random(seed)
    solve(random_cluster(2, rng, shape), ks=[1])  # load the solver once, outside the timings
    rows: list[dict[str, Any]] = []
    for n in device_counts:
        times, ks, ts, used = [], [], [], []
        for _ in range(repeats):
            spec = random_cluster(n, rng, shape)
            with console.status(f"{n} devices × {n_layers} layers…"):
                sol = solve(spec)
            times.append(sol.solve_ms)
            ks.append(sol.prediction.k)
            ts.append(sol.prediction.ms_per_token)
            used.append(len(sol.prediction.in_use))
        rows.append(
            {
                "devices": n,
                "layers": n_layers,
                "solve_ms_median": statistics.median(times),
                "solve_ms_max": max(times),
                "solve_ms": times,
                "k": ks,
                "devices_used": used,
                "predicted_ms_per_token": ts,
                "solver": sol.solver,
            }
        )
    table = Table(title=f"Halda solve time ({repeats} random clusters per size, all k | {n_layers})")
    for col in ("devices", "median ms", "max ms", "k chosen", "devices used", "predicted ms/token"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["devices"]),
            f"{r['solve_ms_median']:.0f}",
            f"{r['solve_ms_max']:.0f}",
            ",".join(map(str, r["k"])),
            ",".join(map(str, r["devices_used"])),
            ", ".join(f"{t:.0f}" for t in r["predicted_ms_per_token"]),
        )
    console.print(table)
    result = {"bench": "plan", "n_layers": n_layers, "repeats": repeats, "seed": seed, "rows": rows}
    write_json(result, out, console)
    return result

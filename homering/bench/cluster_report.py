"""The report of ``homering bench cluster``: the summary's ratios and targets, a table and a PNG chart."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

SPEEDUP_VS_SINGLE = 2.5
"""Halda at least this many times faster than llama.cpp alone on the largest device (issue 18's target)."""
MAX_PRESSURE = 0.06
"""Memory pressure at most this on every device (PRIMA.CPP reports under 6%)."""
MAX_PREDICTION_ERROR = 0.15
"""Halda's predicted ms/token within this fraction of the measured one."""
MOE_SPEEDUP_VS_SINGLE, MOE_MAX_PREDICTION_ERROR = 2.0, 0.20
"""Issue 23's targets for a MoE model (Qwen3-30B-A3B's shape): Halda 2x llama.cpp alone, predicted within 20%."""
MAX_DISK_ERROR = 0.25
"""The plan's disk bytes per token within this fraction of what the devices' cgroups read (issue 23)."""


def summarize(results: dict) -> dict:
    """Ratios and target checks of the headline runs (missing runs give None).

    Targets (``target_*``, booleans): Halda :data:`SPEEDUP_VS_SINGLE` times faster than ``single``, faster than
    ``memory`` and than ``halda_k1`` (the best one-round plan; on a cluster whose RAM is short of the model,
    Halda's rounds and streaming must beat it), its prediction within :data:`MAX_PREDICTION_ERROR`, the memory
    pressure of homering's runs at most :data:`MAX_PRESSURE` on every device, and faster than each peer run.
    """
    r = results["runs"]
    single, memory, halda = (r.get(k) for k in ("single", "memory", "halda"))
    out: dict = {}
    if single and halda:
        out["halda_speedup_vs_single"] = single["ms_per_token"] / halda["ms_per_token"]
        out["target_2_5x_single"] = out["halda_speedup_vs_single"] >= SPEEDUP_VS_SINGLE
    if memory and halda:
        out["halda_speedup_vs_memory"] = memory["ms_per_token"] / halda["ms_per_token"]
        out["target_faster_than_memory"] = halda["ms_per_token"] < memory["ms_per_token"]
    k1 = r.get("halda_k1")
    if k1 and halda:
        out["halda_k"] = halda.get("k")
        out["halda_speedup_vs_k1"] = k1["ms_per_token"] / halda["ms_per_token"]
        out["target_faster_than_k1"] = halda["ms_per_token"] < k1["ms_per_token"]
    if halda:
        pred = halda.get("predicted_ms_per_token")
        if pred:
            out["prediction_error"] = (pred - halda["ms_per_token"]) / halda["ms_per_token"]
            out["target_prediction_15pct"] = abs(out["prediction_error"]) <= MAX_PREDICTION_ERROR
        worst = max((v for run in (memory, halda) if run for v in run["memory_pressure"].values()), default=None)
        out["max_memory_pressure"] = worst
        out["target_pressure_6pct"] = worst is not None and worst <= MAX_PRESSURE
        if single:
            out["single_memory_pressure"] = max(single["memory_pressure"].values())
        if results.get("moe"):
            _moe_targets(out)
        disk = (halda.get("disk_bytes_per_token") or {}).get("error")
        if disk is not None:
            out["disk_prediction_error"] = disk
            out["target_disk_25pct"] = abs(disk) <= MAX_DISK_ERROR
    one = r.get("halda_one_batch")
    if one and halda:
        out["prefill_ttft_micro_over_one_batch"] = halda["ttft_ms"] / one["ttft_ms"]
    rel, norel = r.get("halda_release"), r.get("halda_no_release")
    if rel and norel:
        out["release_ms_per_token_ratio"] = rel["ms_per_token"] / norel["ms_per_token"]
    out.update(_versus_peers(r))
    return out


def _moe_targets(out: dict) -> None:
    """Issue 23's targets on a MoE model, beside issue 18's (the same ratios, other bounds)."""
    if "halda_speedup_vs_single" in out:
        out["target_moe_2x_single"] = out["halda_speedup_vs_single"] >= MOE_SPEEDUP_VS_SINGLE
    if "prediction_error" in out:
        out["target_moe_prediction_20pct"] = abs(out["prediction_error"]) <= MOE_MAX_PREDICTION_ERROR


def _versus_peers(r: dict) -> dict:
    """Halda against the peer systems' runs: speed-ups (a peer's ms/token over Halda's) and targets; a peer run
    that hit OOM counts as beaten."""
    out: dict = {}
    halda = r.get("halda")
    for key in ("prima", "prima_same_windows", "rpc"):
        peer = r.get(key)
        if not (halda and peer):
            continue
        if peer.get("oom"):
            out[f"target_faster_than_{key}"] = True
            continue
        out[f"halda_speedup_vs_{key}"] = peer["ms_per_token"] / halda["ms_per_token"]
        out[f"target_faster_than_{key}"] = halda["ms_per_token"] < peer["ms_per_token"]
    pressures = [v for key in ("prima", "prima_same_windows") if key in r for v in r[key]["memory_pressure"].values()]
    if pressures:
        out["prima_max_memory_pressure"] = max(pressures)
    return out


def table(results: dict) -> Table:
    """A rich table of the runs: ms/token, the predicted ms/token, TTFT, k and the highest memory pressure."""
    t = Table(title=f"bench cluster: {Path(results['model']).name} on {results['spec']}")
    for col in ("run", "ms/token", "predicted", "TTFT ms", "k", "max pressure"):
        t.add_column(col, justify="right")
    for key, run in results["runs"].items():
        if run.get("oom"):
            pressure = f"{max(run['memory_pressure'].values(), default=0):.1%}"
            t.add_row(key, "OOM", "-", "OOM", "-", pressure)
            continue
        pred = run.get("predicted_ms_per_token")
        t.add_row(
            key,
            f"{run['ms_per_token']:.1f}",
            f"{pred:.1f}" if pred else "-",
            f"{run['ttft_ms']:.0f}",
            str(run.get("k", "-")),
            f"{max(run['memory_pressure'].values()):.1%}",
        )
    return t


_COLORS = {"single": "#888", "prima": "#c73", "prima_same_windows": "#c73", "rpc": "#57c"}


def chart(results: dict, path: Path) -> Path:
    """A PNG with two bar charts: decode ms/token and TTFT per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k, run in results["runs"].items() if not run.get("oom")]  # an OOM run has no times
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in (
        (axes[0], "ms_per_token", "decode, ms/token (lower is better)"),
        (axes[1], "ttft_ms", "TTFT, ms (lower is better)"),
    ):
        vals = [results["runs"][k][metric] for k in keys]
        bars = ax.bar(keys, vals, color=[_COLORS.get(k, "#4a7") for k in keys])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    if "halda" in results["runs"] and results["runs"]["halda"].get("predicted_ms_per_token"):
        axes[0].axhline(
            results["runs"]["halda"]["predicted_ms_per_token"], ls="--", color="k", lw=0.8, label="Halda's prediction"
        )
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(results['model']).name} on {Path(results['spec']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe_testbed(tb) -> dict:
    """The testbed's part of the results: its traffic shaping, warnings, devices and where its logs are."""
    return {
        **{"shaping": tb.shaping, "warnings": tb.warnings, "devices": {d: tb.describe(d) for d in tb.devices}},
        "logs": str(Path(tb.workdir) / "logs"),  # the processes' logs, until the testbed's next up
    }


def write_results(results: dict, out: Path) -> None:
    """Write the results as JSON to ``out`` (also after each run, to a partial file: a long benchmark that fails
    late keeps what it measured)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


def report(results: dict, out: Path, console: Console) -> None:
    """Print the table, write the results as JSON to ``out`` and the chart next to it (a PNG; none when every run
    hit OOM: there is nothing to draw)."""
    console.print(table(results))
    write_results(results, out)
    if all(run.get("oom") for run in results["runs"].values()):
        console.print(f"wrote {out}")
        return
    png = chart(results, out.with_suffix(".png"))
    logs = results.get("testbed", {}).get("logs")
    console.print(f"wrote {out} and {png}" + (f"; the processes' logs: {logs}" if logs else ""))

"""How ``homering plan`` shows a plan: the ``--json`` document and the rich table."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from homering.planner import PlanResult


def plan_json(result: PlanResult) -> dict[str, Any]:
    """The ``homering plan --json`` document.

    Keys: ``k``, ``layers_per_round``, ``predicted_ms_per_token``, ``devices``
    (every device in ring order: ``name``, ``layers_per_round``,
    ``gpu_layers_per_round``, ``mode`` — null when dropped —, ``windows`` as
    ``[a, b)`` pairs, ``predicted`` = ``{compute_ms, disk_ms, hop_ms}`` summed
    over the k rounds), ``dropped``, ``solve_ms``, plus ``planner`` and
    ``per_k`` (the optimum for every k tried, ms per token).
    """
    p = result.prediction
    return {
        "k": p.k,
        "layers_per_round": p.layers_per_round,
        "predicted_ms_per_token": p.ms_per_token,
        "devices": [
            {
                "name": d.name,
                "layers_per_round": d.layers_per_round,
                "gpu_layers_per_round": d.gpu_layers_per_round,
                "mode": d.mode,
                "windows": [list(w) for w in d.windows],
                "predicted": {"compute_ms": d.compute_ms, "disk_ms": d.disk_ms, "hop_ms": d.hop_ms},
            }
            for d in p.devices
        ],
        "dropped": p.dropped,
        "solve_ms": result.solve_ms,
        "planner": result.planner,
        "per_k": {str(k): v for k, v in result.per_k.items()},
    }


def plan_table(result: PlanResult, title: str | None = None) -> Table:
    """A rich table of the plan: one row per device (ring order, head last), costs in ms per token."""
    p = result.prediction
    table = Table(
        title=title
        or f"{result.planner}: k={p.k}, {p.layers_per_round} layers per round, "
        f"predicted {p.ms_per_token:.1f} ms/token (solved in {result.solve_ms:.0f} ms)"
    )
    for col in ("device", "layers", "gpu", "mode", "windows", "compute ms", "disk ms", "hop ms"):
        table.add_column(col, justify="left" if col in ("device", "mode", "windows") else "right")
    for i, d in enumerate(p.devices):
        name = d.name + (" (head)" if i == len(p.devices) - 1 else "")
        if d.mode is None:
            table.add_row(name, "0", "0", "[dim]dropped[/]", "", "", "", "")
            continue
        windows = ", ".join(f"[{a},{b})" for a, b in d.windows[:4]) + (" …" if len(d.windows) > 4 else "")
        table.add_row(
            name,
            str(d.layers_per_round),
            str(d.gpu_layers_per_round),
            d.mode,
            windows,
            f"{d.compute_ms:.1f}",
            f"{d.disk_ms:.1f}",
            f"{d.hop_ms:.1f}",
        )
    return table

"""``homering plan``: plan a cluster offline from a cluster.json."""

from __future__ import annotations

import click


@click.command("plan")
@click.option(
    "--cluster",
    "cluster_file",
    required=True,
    type=click.Path(dir_okay=False),
    help='cluster.json: {"model": {...}, "devices": [...]} (schema in the README).',
)
@click.option(
    "--model",
    default=None,
    metavar="NAME|PATH",
    help="Derive the model block from this GGUF (with --ctx) instead of the file's.",
)
@click.option(
    "--ctx",
    "n_ctx",
    type=click.IntRange(16, 1 << 20),
    default=4096,
    show_default=True,
    help="Context size for the KV-cache bytes when --model is given.",
)
@click.option(
    "--batch",
    "n_batch",
    type=click.IntRange(1, 1 << 16),
    default=None,
    help="Prefill micro-batch for the compute-buffer bytes when --model is given [default: the controller's, 64].",
)
@click.option(
    "--planner",
    type=click.Choice(["halda", "memory", "proportional"]),
    default="halda",
    show_default=True,
    help="Planner to run.",
)
@click.option(
    "--k",
    "ks",
    type=click.IntRange(1, 1 << 16),
    multiple=True,
    help="Rounds to consider (repeatable) [default: every divisor of the layer count].",
)
@click.option("--compare", is_flag=True, help="Also show the baselines' plans (memory, proportional).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
def plan_cmd(cluster_file, model, n_ctx, n_batch, planner, ks, compare, as_json) -> None:
    """Plan a cluster offline: the layer assignment that minimises the predicted ms per token.

    Example: `homering plan --cluster examples/clusters/prima-home4.json`.
    """
    import json

    from rich.console import Console

    from homering.planner import DEFAULT_BATCH, plan_cluster
    from homering.planner.model import load_cluster, shape_from_gguf
    from homering.planner.report import plan_json, plan_table

    shape = None
    if model is not None:
        from homering.models.registry import resolve_model

        shape = shape_from_gguf(resolve_model(model), n_ctx, n_batch=n_batch or DEFAULT_BATCH)
    spec = load_cluster(cluster_file, shape)
    names = [planner] + ([p for p in ("halda", "memory", "proportional") if p != planner] if compare else [])
    results = [plan_cluster(spec, name, list(ks) or None) for name in names]
    if as_json:
        doc = plan_json(results[0])
        if compare:
            doc["compare"] = {r.planner: plan_json(r) for r in results[1:]}
        click.echo(json.dumps(doc, indent=2))
        return
    console = Console()
    for r in results:
        console.print(plan_table(r))

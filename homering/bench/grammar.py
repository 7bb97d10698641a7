"""``homering bench grammar``: decode speed with a JSON-schema grammar against unconstrained decoding.

One local cluster (embedded broker, controller, N agents, the proportional planner) serves both in the same
run, alternating: the same chat prompt, greedy, ``n_tokens`` tokens, once free and once constrained by the
grammar of :data:`SCHEMA` (an array of at least :data:`MIN_ITEMS` nested objects, so that the grammar never
lets the answer end before ``n_tokens``). The head reports ms/token (decode only, prefill excluded); the
medians give tokens/s and the grammar's cost, ``1 - constrained / free`` tokens/s (the issue's target: at
most 10%). The grammar runs on the head after the sampler chain (:mod:`homering.engine.grammar`): one
token's check per step, the whole vocabulary only when the model's pick breaks the format.
"""

from __future__ import annotations

import asyncio
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

from homering.bench import write_json
from homering.client.chat import ask
from homering.client.client import ClusterClient, new_request_id
from homering.client.local import LocalCluster
from homering.engine.grammar import schema_to_gbnf
from homering.wire import ChatMessage, GenerateRequest, Sampling

MIN_ITEMS = 64
SCHEMA = {
    "type": "array",
    "minItems": MIN_ITEMS,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "fish"]}},
        },
        "required": ["name", "age", "address", "pets"],
    },
}
PROMPT = "List people as a JSON array of objects with a name, an age, an address (a city) and their pets."


async def _runs(cluster: LocalCluster, n_tokens: int, repeats: int) -> dict[str, list[float]]:
    """ms/token of each run, free and constrained, alternating (after one warm-up of each)."""
    assert cluster.broker is not None  # the cluster is up
    grammar = schema_to_gbnf(SCHEMA)
    out: dict[str, list[float]] = {"free": [], "grammar": []}
    async with ClusterClient(cluster.broker) as client:
        await client.wait_ready(300)
        for i in range(repeats + 1):
            for kind in ("free", "grammar"):
                req = GenerateRequest(
                    request_id=new_request_id(),
                    messages=[ChatMessage(role="user", content=PROMPT)],
                    sampling=Sampling(max_tokens=n_tokens, temperature=0, ignore_eos=True),
                    grammar=grammar if kind == "grammar" else None,
                )
                answer = await ask(client, req)
                if len(answer.token_ids) != n_tokens or answer.ms_per_token is None:
                    raise RuntimeError(f"a {kind} run ended after {len(answer.token_ids)} of {n_tokens} tokens")
                if i:  # the first round warms up
                    out[kind].append(answer.ms_per_token)
    return out


def run_grammar_bench(
    model_path: Path,
    *,
    agents: int,
    threads: int,
    n_tokens: int = 128,
    repeats: int = 3,
    out: str | Path = "bench-results/grammar.json",
    broker=None,
    console: Console | None = None,
) -> dict:
    """Run the benchmark, print a table, write JSON to ``out``, and return the results.

    Returns:
        ``{"free": {...}, "grammar": {...}, "grammar_cost": fraction}``: each with ``ms_per_token`` (median),
        ``runs_ms_per_token`` and ``tokens_per_s``; ``grammar_cost`` is ``1 - grammar / free`` tokens/s.
    """
    console = console or Console(stderr=True)
    with (
        console.status(f"{agents} agent(s), free and JSON-schema decoding…"),
        LocalCluster(
            model_path, n_agents=agents, threads=threads, broker=broker, planner="proportional", log_args=("-qq",)
        ) as cluster,
    ):
        runs = asyncio.run(_runs(cluster, n_tokens, repeats))
    results: dict = {"model": str(model_path), "agents": agents, "threads": threads, "tokens": n_tokens}
    results["repeats"] = repeats
    table = Table(title=f"grammar, {Path(model_path).name}, {agents} agent(s), {n_tokens} tokens")
    for col in ("decoding", "ms/token", "tokens/s"):
        table.add_column(col, justify="right")
    for kind in ("free", "grammar"):
        ms = statistics.median(runs[kind])
        results[kind] = {"ms_per_token": ms, "runs_ms_per_token": runs[kind], "tokens_per_s": 1000 / ms}
        table.add_row("unconstrained" if kind == "free" else "JSON schema", f"{ms:.2f}", f"{1000 / ms:.1f}")
    results["grammar_cost"] = 1 - results["grammar"]["tokens_per_s"] / results["free"]["tokens_per_s"]
    Console().print(table)
    Console().print(f"the grammar costs {100 * results['grammar_cost']:.1f}% of the tokens/s (target: at most 10%)")
    write_json(results, out)
    return results

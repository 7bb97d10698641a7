"""``homering bench concurrent``: aggregate tokens/s of the ring with 1, 2, 4 … requests in flight.

One local cluster (embedded broker, controller, N agents, the proportional
planner so that every agent holds a window) serves every stream count in
the same run. For a stream count S, S greedy requests of ``n_tokens`` tokens
each (past end-of-generation, so every run does the same work) are sent at
once; aggregate tokens/s is S × n_tokens over the wall time from sending the
first to receiving the last answer (prefill included). Each request owns a
KV sequence, so while one agent works on request A's token, another works on
request B's (the ring is a pipeline).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from homering.bench import write_json
from homering.client.chat import ask
from homering.client.client import ClusterClient, new_request_id
from homering.client.local import LocalCluster
from homering.wire import GenerateRequest, Sampling

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived",
    "The history of the printing press begins",
    "A good recipe for bread needs",
    "The planets of the solar system are",
    "In the morning the market square",
    "The old lighthouse keeper said",
    "Mathematics is the study of",
    "The train left the station at",
]


async def _runs(cluster: LocalCluster, streams: list[int], n_tokens: int, repeats: int) -> list[dict]:
    out = []
    assert cluster.broker is not None  # the cluster is up
    async with ClusterClient(cluster.broker) as client:
        await client.wait_ready(300)
        sampling = Sampling(max_tokens=n_tokens, temperature=0, ignore_eos=True)
        await ask(client, GenerateRequest(request_id=new_request_id(), prompt=PROMPTS[0], sampling=sampling))  # warm
        for s in streams:
            walls, per_token = [], []
            for _ in range(repeats):
                reqs = [
                    GenerateRequest(request_id=new_request_id(), prompt=PROMPTS[i % len(PROMPTS)], sampling=sampling)
                    for i in range(s)
                ]
                t0 = time.perf_counter()
                answers = await asyncio.gather(*(ask(client, r) for r in reqs))
                walls.append(time.perf_counter() - t0)
                per_token.append(statistics.mean(a.ms_per_token for a in answers if a.ms_per_token is not None))
                if any(len(a.token_ids) != n_tokens for a in answers):
                    raise RuntimeError("a request ended early")
            wall = statistics.median(walls)
            out.append(
                {
                    "streams": s,
                    "wall_s": wall,
                    "walls_s": walls,
                    "tokens": s * n_tokens,
                    "tokens_per_s": s * n_tokens / wall,
                    "ms_per_token_per_request": statistics.median(per_token),
                }
            )
    return out


def run_concurrent_bench(
    model_path: Path,
    *,
    agents: int,
    streams: list[int],
    threads: int,
    n_tokens: int = 64,
    repeats: int = 3,
    out: str | Path = "bench-results/concurrent.json",
    broker=None,
    console: Console | None = None,
) -> dict:
    """Run the benchmark, print a table, write JSON to ``out``, and return the results."""
    console = console or Console(stderr=True)
    streams = sorted(set(streams))
    with (
        console.status(f"{agents} agent(s), {max(streams)} sequences…"),
        LocalCluster(
            model_path,
            n_agents=agents,
            threads=threads,
            broker=broker,
            planner="proportional",
            controller_args=("--parallel", str(max(streams))),
            log_args=("-qq",),
        ) as cluster,
    ):
        runs = asyncio.run(_runs(cluster, streams, n_tokens, repeats))
    base = runs[0]["tokens_per_s"]
    for r in runs:
        r["speedup_vs_first"] = r["tokens_per_s"] / base
    results = {
        "model": str(model_path),
        "agents": agents,
        "threads": threads,
        "tokens": n_tokens,
        "repeats": repeats,
        "planner": "proportional",
        "runs": runs,
    }
    table = Table(
        title=f"concurrent streams, {Path(model_path).name}, {agents} agents × {threads} thread(s), "
        f"{n_tokens} tokens each"
    )
    for col in ("streams", "aggregate tokens/s", f"× {streams[0]} stream(s)", "ms/token per request", "wall s"):
        table.add_column(col, justify="right")
    for r in runs:
        table.add_row(
            str(r["streams"]),
            f"{r['tokens_per_s']:.1f}",
            f"{r['speedup_vs_first']:.2f}",
            f"{r['ms_per_token_per_request']:.1f}",
            f"{r['wall_s']:.2f}",
        )
    Console().print(table)
    write_json(results, out, console)
    return results

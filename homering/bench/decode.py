"""``homering bench decode``: ring decode speed against plain llama-cpp-python.

For each cluster size the benchmark starts a local cluster (embedded broker,
controller, agents with the same thread count as the baseline), decodes
``n_tokens`` greedy tokens ``repeats`` times and takes the median time per
token as reported by the head (decode only: prompt processing excluded). The
baseline is the unsplit model in plain llama-cpp-python (``Llama.eval`` one
token at a time, greedy), measured in the same run, between the cluster runs,
so the ratios are comparable on a noisy machine.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from homering.bench import write_json
from homering.bench.peers import peer_binaries, run_prima, run_rpc
from homering.client.chat import ask
from homering.client.client import ClusterClient, new_request_id
from homering.client.local import LocalCluster
from homering.wire import GenerateRequest, Sampling

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def baseline_ms_per_token(model_path: Path, threads: int, n_tokens: int) -> float:
    """Single run: ms per greedy decode step of plain ``llama_cpp.Llama`` (:func:`homering.bench.single.run`)."""
    from homering.bench.single import run
    from homering.engine.tokenizer import Tokenizer

    tok = Tokenizer(model_path)
    try:
        ids = tok.tokenize(PROMPT, add_special=True)
    finally:
        tok.close()
    return run(str(model_path), ids, n_tokens + 1, threads=threads, n_ctx=2048)["ms_per_token"]


async def _cluster_runs(cluster: LocalCluster, n_tokens: int, repeats: int) -> list[dict]:
    out = []
    assert cluster.broker is not None  # the cluster is up
    async with ClusterClient(cluster.broker) as client:
        await client.wait_ready(300)
        for _ in range(repeats):
            req = GenerateRequest(
                request_id=new_request_id(), prompt=PROMPT, sampling=Sampling(max_tokens=n_tokens, temperature=0)
            )
            answer = await ask(client, req)
            out.append(
                {"ms_per_token": answer.ms_per_token, "ttft_ms": answer.ttft_ms, "tokens": len(answer.token_ids)}
            )
    return out


def run_decode_bench(
    model_path: Path,
    agent_counts: list[int],
    *,
    threads: int,
    n_tokens: int = 128,
    repeats: int = 3,
    out: str | Path = "bench-results/decode.json",
    broker=None,
    peers: Sequence[str] = (),
    console: Console | None = None,
) -> dict:
    """Run the benchmark, print a table, write JSON to ``out``, and return the results.

    ``peers`` (``"prima"``, ``"rpc"``: :mod:`homering.bench.peers`) run as many processes as each cluster
    size, one thread each like the agents, in the same run; ``runs`` in the JSON then has
    ``homering_<n>``, ``prima_<n>`` and ``rpc_<n>``, each with ``ms_per_token``.

    Raises:
        HomeringError: a peer that is not built, or that fails.
    """
    console = console or Console(stderr=True)
    bins = peer_binaries(peers) if peers else {}
    baseline: list[float] = []
    results: dict = {
        "model": str(model_path),
        "threads": threads,
        "tokens": n_tokens,
        "repeats": repeats,
        "broker": str(broker) if broker else "own (mosquitto if installed, else amqtt)",
        "configs": [],
    }
    for count in agent_counts:
        with console.status(f"baseline (plain llama-cpp-python, {threads} threads)…"):
            baseline.append(baseline_ms_per_token(model_path, threads, n_tokens))
        with (
            console.status(f"{count} agent(s)…"),
            LocalCluster(
                model_path, n_agents=count, threads=threads, broker=broker, planner="proportional", log_args=("-qq",)
            ) as cluster,
        ):
            runs = asyncio.run(_cluster_runs(cluster, n_tokens, repeats))
        results["configs"].append(
            {"agents": count, "runs": runs, "ms_per_token": statistics.median(r["ms_per_token"] for r in runs)}
        )
    with console.status("baseline…"):
        baseline.append(baseline_ms_per_token(model_path, threads, n_tokens))
    results["runs"] = _peer_runs(results["configs"], peers, bins, model_path, threads, n_tokens, repeats, console)
    base = statistics.median(baseline)
    results["baseline_ms_per_token"] = base
    results["baseline_runs_ms_per_token"] = baseline

    Console().print(_table(results, Path(model_path).name, base))
    write_json(results, out)
    return results


def _table(results: dict, model_name: str, base: float) -> Table:
    """The results as a table (ms/token, tokens/s, × the baseline); adds each config's ratio to ``results``."""
    threads, n_tokens = results["threads"], results["tokens"]
    table = Table(title=f"decode, {model_name}, {threads} threads, {n_tokens} tokens")
    for col in ("setup", "ms/token", "tokens/s", "× baseline"):
        table.add_column(col, justify="right")
    table.add_row("llama-cpp-python", f"{base:.2f}", f"{1000 / base:.1f}", "1.00")
    for cfg in results["configs"]:
        cfg["tokens_per_s"] = 1000 / cfg["ms_per_token"]
        cfg["ratio_vs_baseline"] = base / cfg["ms_per_token"]
        table.add_row(
            f"{cfg['agents']} agent(s)",
            f"{cfg['ms_per_token']:.2f}",
            f"{cfg['tokens_per_s']:.1f}",
            f"{cfg['ratio_vs_baseline']:.2f}",
        )
    for key, run in results["runs"].items():
        if not key.startswith("homering_"):
            table.add_row(key, f"{run['ms_per_token']:.2f}", f"{1000 / run['ms_per_token']:.1f}",
                          f"{base / run['ms_per_token']:.2f}")  # fmt: skip
    return table


def _peer_runs(configs: list[dict], peers: Sequence[str], bins: dict[str, str], model_path: Path, threads: int,
               n_tokens: int, repeats: int, console: Console) -> dict[str, dict]:  # fmt: skip
    """``homering_<n>`` from the cluster runs and, for each peer, ``<peer>_<n>``: the median of ``repeats`` runs
    with ``n`` processes."""
    from homering.models.gguf_info import inspect_gguf

    runs: dict[str, dict] = {f"homering_{c['agents']}": {"ms_per_token": c["ms_per_token"]} for c in configs}
    n_layers = inspect_gguf(model_path).n_layers
    for peer in peers:
        for cfg in configs:
            n = cfg["agents"]
            with console.status(f"{peer}, {n} process(es)…"):
                times = [
                    run_prima(bins, model_path, n, n_layers, prompt=PROMPT, n_tokens=n_tokens, threads=threads)
                    if peer == "prima"
                    else run_rpc(bins, model_path, n, prompt=PROMPT, n_tokens=n_tokens, threads=threads)
                    for _ in range(repeats)
                ]
            runs[f"{peer}_{n}"] = {"ms_per_token": statistics.median(times), "runs_ms_per_token": times}
    return runs

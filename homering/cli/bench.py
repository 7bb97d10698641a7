"""``homering bench decode|concurrent|faults|plan|cluster|grammar``: the benchmarks' command lines."""

from __future__ import annotations

import click

from homering.cli.options import MODEL_OPTION, Duration, broker_options, child_log_args

SPEC_OPTION = click.option(
    "--spec",
    "spec_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The testbed's cluster spec (YAML), e.g. examples/clusters/home4.yaml.",
)


@click.group()
def bench() -> None:
    """Benchmarks: print numbers and write JSON."""


def _bench_run_options(name: str):
    """--repeats, --out and the broker options, shared by the benchmarks that start local clusters."""

    def wrap(fn):
        for opt in reversed(
            [
                click.option(
                    "--repeats",
                    type=click.IntRange(1, 20),
                    default=3,
                    show_default=True,
                    help="Runs per configuration (the median is reported).",
                ),
                click.option(
                    "--out",
                    type=click.Path(dir_okay=False),
                    default=f"bench-results/{name}.json",
                    show_default=True,
                    help="Where to write the JSON results.",
                ),
            ]
        ):
            fn = opt(fn)
        return broker_options(embedded=True)(fn)

    return wrap


@bench.command("decode")
@click.option(
    "--agents",
    "agent_counts",
    type=click.IntRange(1, 16),
    multiple=True,
    default=(1, 3),
    show_default=True,
    help="Cluster sizes to compare (repeat the option, or list them).",
)
@click.argument("more_counts", nargs=-1, type=click.IntRange(1, 16))
@MODEL_OPTION
@click.option(
    "--threads",
    "-t",
    type=click.IntRange(1, 512),
    default=None,
    help="llama.cpp threads (the same for the baseline and every agent) [default: all cores but one].",
)
@click.option(
    "--tokens", type=click.IntRange(8, 4096), default=128, show_default=True, help="Tokens to decode per run."
)
@click.option(
    "--peers",
    callback=lambda ctx, param, value: _peers(value),
    default=None,
    metavar="prima,rpc",
    help="Also run these peer systems with as many processes (1 thread each), in the same run: prima.cpp's "
    "ring and llama.cpp RPC (build them with `make peers`).",
)
@_bench_run_options("decode")
def bench_decode(agent_counts, more_counts, model, threads, tokens, peers, repeats, out, broker) -> None:
    """Decode tokens/s of the ring against plain llama-cpp-python, in one run.

    Example: `homering bench decode --agents 1 3`, or `homering bench decode --agents 3 --threads 1
    --peers prima,rpc` (the toy-scale comparison with the paper's own system and llama.cpp RPC).
    """
    from homering.bench.decode import run_decode_bench
    from homering.client.local import default_threads
    from homering.models.registry import resolve_model

    counts = sorted(set(agent_counts) | set(more_counts))
    run_decode_bench(
        resolve_model(model),
        counts,
        threads=threads or default_threads(),
        n_tokens=tokens,
        repeats=repeats,
        out=out,
        broker=broker,
        peers=peers,
    )


def _peers(value: str | None) -> list[str]:
    """``--peers``: the names, checked (a usage error for an unknown one)."""
    from homering.bench.peers import parse_peers
    from homering.errors import HomeringError

    try:
        return parse_peers(value)
    except HomeringError as exc:
        raise click.BadParameter(str(exc)) from None


@bench.command("concurrent")
@click.option("--agents", type=click.IntRange(1, 16), default=4, show_default=True, help="Agents in the ring.")
@click.option(
    "--streams",
    "streams",
    type=click.IntRange(1, 64),
    multiple=True,
    default=(1, 4),
    show_default=True,
    help="Requests in flight at once to compare (repeat the option, or list them).",
)
@click.argument("more_streams", nargs=-1, type=click.IntRange(1, 64))
@MODEL_OPTION
@click.option(
    "--threads", "-t", type=click.IntRange(1, 512), default=1, show_default=True, help="llama.cpp threads per agent."
)
@click.option(
    "--tokens", type=click.IntRange(4, 4096), default=64, show_default=True, help="Tokens each request generates."
)
@_bench_run_options("concurrent")
def bench_concurrent(agents, streams, more_streams, model, threads, tokens, repeats, out, broker) -> None:
    """Aggregate tokens/s with several requests sharing the ring, in one run.

    Example: `homering bench concurrent --agents 4 --streams 1 4`.
    """
    from homering.bench.concurrent import run_concurrent_bench
    from homering.models.registry import resolve_model

    run_concurrent_bench(
        resolve_model(model),
        agents=agents,
        streams=list(streams) + list(more_streams),
        threads=threads,
        n_tokens=tokens,
        repeats=repeats,
        out=out,
        broker=broker,
    )


@bench.command("faults")
@click.option(
    "--agents", type=click.IntRange(2, 16), default=4, show_default=True, help="Emulated devices, one agent each."
)
@click.option(
    "--requests",
    type=click.IntRange(1, 100000),
    default=100,
    show_default=True,
    help="Greedy requests to send while agents are killed.",
)
@click.option(
    "--concurrency", type=click.IntRange(1, 64), default=1, show_default=True, help="Requests in flight at once."
)
@click.option(
    "--kill-every", type=Duration(), default="10s", show_default=True, help="SIGKILL a random agent this often."
)
@click.option(
    "--restart-after",
    type=Duration(),
    default="5s",
    show_default=True,
    help="Start a killed agent again after this long (it rejoins at a request boundary).",
)
@click.option(
    "--tokens", type=click.IntRange(2, 4096), default=32, show_default=True, help="Tokens each request generates."
)
@MODEL_OPTION
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the choice of victims.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="bench-results/faults.json",
    show_default=True,
    help="Where to write the JSON results.",
)
def bench_faults(agents, requests, concurrency, kill_every, restart_after, tokens, model, seed, out) -> None:
    """Soak test on the emulated cluster (root, Linux): kill agents while requests flow.

    Reports requests completed and garbled (the answer differs from the
    fault-free one; must be all and 0) and the recovery pause per kill
    (p50, p95). Example: `homering bench faults --agents 4 --requests 100 --kill-every 10s`.
    """
    from homering.bench.faults import run_faults_bench
    from homering.models.registry import resolve_model
    from homering.testbed import require_root

    require_root()
    run_faults_bench(
        resolve_model(model),
        agents=agents,
        requests=requests,
        concurrency=concurrency,
        kill_every=kill_every,
        restart_after=restart_after,
        n_tokens=tokens,
        seed=seed,
        out=out,
    )


@bench.command("plan")
@click.option(
    "--devices",
    "device_counts",
    type=click.IntRange(1, 64),
    multiple=True,
    default=(4, 8, 16),
    show_default=True,
    help="Cluster sizes (repeatable).",
)
@click.option(
    "--layers",
    type=click.IntRange(1, 1024),
    default=80,
    show_default=True,
    help="Model layers (every divisor is a candidate k).",
)
@click.option("--repeats", type=click.IntRange(1, 50), default=3, show_default=True, help="Random clusters per size.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random clusters.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="bench-results/plan.json",
    show_default=True,
    help="Where to write the JSON results.",
)
def bench_plan(device_counts, layers, repeats, seed, out) -> None:
    """Halda's solve time on random heterogeneous clusters (a Llama-3-70B-sized model by default)."""
    from homering.bench.plan import run_plan_bench

    run_plan_bench(list(device_counts), n_layers=layers, repeats=repeats, seed=seed, out=out)


@bench.command("cluster")
@SPEC_OPTION
@click.option(
    "--model", "-m", default=None, metavar="NAME|PATH", help="Model name or GGUF path [default: the spec's model]."
)
@click.option(
    "--tokens", type=click.IntRange(2, 4096), default=16, show_default=True, help="Greedy tokens per measured request."
)
@click.option(
    "--prompt-tokens", type=click.IntRange(2, 8192), default=64, show_default=True, help="Prompt length for TTFT."
)
@click.option(
    "--batch",
    type=click.IntRange(1, 8192),
    default=64,
    show_default=True,
    help="Prefill micro-batch of the homering runs.",
)
@click.option(
    "--runs",
    default=None,
    metavar="KEYS",
    help="Comma-separated subset of: single,memory,halda,halda_k1,halda_no_stream,halda_one_batch,"
    "halda_release,halda_no_release, and with --peers prima,prima_same_windows,rpc [default: all].",
)
@click.option(
    "--peers",
    callback=lambda ctx, param, value: _peers(value),
    default=None,
    metavar="prima,rpc",
    help="Also run these peer systems, one process per device, in the same run: prima.cpp with its own Halda "
    "plan (prima) and with homering's Halda windows (prima_same_windows), and llama.cpp RPC (rpc); build them "
    "with `make peers`.",
)
@click.option("--out-dir", type=click.Path(file_okay=False), default="bench/results", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Also print the results as one JSON object on stdout.")
@click.pass_obj
def bench_cluster(obj, spec_path, model, tokens, prompt_tokens, batch, runs, peers, out_dir, as_json) -> None:
    """The headline: a model bigger than any one device, on an emulated home cluster (needs root on Linux).

    Brings the testbed up, then runs plain llama-cpp-python on the largest
    device alone (single), homering with the memory planner and k=1 (memory),
    and homering with Halda, rounds and prefetching (halda); also the prompt
    as one batch and --release on/off; with --peers, prima.cpp and llama.cpp
    RPC on the same devices. Writes bench/results/cluster-*.json and a PNG
    chart.

    Example: `homering bench cluster --spec examples/clusters/home4.yaml --model llama3.2-3b-q4_0 --json`, or
    `… --model qwen2.5-32b-q4_k_m --peers prima,rpc` (prima.cpp's profiler needs a K-quant). With
    `homering -v bench cluster …` the agents and controllers log at -v in the testbed's logs folder.
    """
    import json
    from pathlib import Path

    from homering.bench.cluster import run_cluster_bench

    keys = [k.strip() for k in runs.split(",") if k.strip()] if runs else None
    results = run_cluster_bench(
        Path(spec_path),
        model,
        tokens=tokens,
        prompt_tokens=prompt_tokens,
        batch=batch,
        keys=keys,
        peers=peers,
        out_dir=Path(out_dir),
        log_args=child_log_args(obj["verbosity"]),
    )
    if as_json:
        click.echo(json.dumps(results, indent=2))


@bench.command("speculative")
@SPEC_OPTION
@click.option(
    "--tokens",
    type=click.IntRange(8, 512),
    default=128,
    show_default=True,
    help="Greedy tokens per prompt of the model pairs (the n-gram answers run to their end of generation).",
)
@click.option(
    "--out-dir", type=click.Path(file_okay=False), default="bench/results", show_default=True, help="Where to write."
)
@click.option(
    "--runs",
    type=click.Choice(["ngram", "draft", "draft_no_agreement"]),
    multiple=True,
    help="Only this run (repeat the option for several) [default: all three].",
)
@click.pass_obj
def bench_speculative(obj, spec_path, tokens, out_dir, runs) -> None:
    """Speculative decoding on an emulated home cluster (needs root on Linux): n-gram drafts on edit/summary/JSON
    prompts, the F16/Q4_1 SmolLM2 pair, and a pair that never agrees; tokens/s against plain decoding of the same
    prompts on the same plan, acceptance rate, mean γ. Writes bench/results/speculative-*.json and a PNG.

    Example: `homering bench speculative --spec examples/clusters/home4.yaml`. With `homering -v bench
    speculative …` the head logs every trip (γ, drafts kept, ms around the ring and drafting) in the testbed's
    logs folder.
    """
    from pathlib import Path

    from homering.bench.speculative import run_speculative_bench

    run_speculative_bench(
        Path(spec_path),
        tokens=tokens,
        out_dir=Path(out_dir),
        only=list(runs) or None,
        log_args=child_log_args(obj["verbosity"]),
    )


@bench.command("grammar")
@click.option("--agents", type=click.IntRange(1, 16), default=2, show_default=True, help="Agents in the ring.")
@MODEL_OPTION
@click.option(
    "--threads", "-t", type=click.IntRange(1, 512), default=1, show_default=True, help="llama.cpp threads per agent."
)
@click.option("--tokens", type=click.IntRange(8, 4096), default=128, show_default=True, help="Tokens per run.")
@_bench_run_options("grammar")
def bench_grammar(agents, model, threads, tokens, repeats, out, broker) -> None:
    """Tokens/s with a JSON-schema grammar against unconstrained decoding, in one run.

    Example: `homering bench grammar --agents 2 --tokens 128`.
    """
    from homering.bench.grammar import run_grammar_bench
    from homering.models.registry import resolve_model

    run_grammar_bench(
        resolve_model(model), agents=agents, threads=threads, n_tokens=tokens, repeats=repeats, out=out, broker=broker
    )

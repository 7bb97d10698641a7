"""The runs of ``homering bench cluster`` (:mod:`homering.bench.cluster`): which there are, in which order, and
how ``--runs`` selects them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from homering.bench.cluster_peers import PEER_RUNS, peer_run_keys
from homering.errors import HomeringError


@dataclass
class RunConfig:
    """One measured run of the cluster (``planner`` None: the single-device baseline; ``peer``: a peer system's
    run, :mod:`homering.bench.cluster_peers`)."""

    key: str
    label: str
    planner: str | None = None
    rounds: int | None = None
    batch: int | None = None
    release: bool | None = None
    peer: bool = False


def default_configs(*, prefill: bool, release: bool, batch: int, prompt_tokens: int, n_layers: int) -> list[RunConfig]:
    """The runs of the benchmark, in order.

    The release runs use the smallest k > 1 that divides ``n_layers``: with
    one round a device has one window, needed again at every token, and
    ``--release`` does nothing.
    """
    out = [
        RunConfig("single", "llama-cpp-python, largest device"),
        RunConfig("memory", "homering, memory planner, k=1", planner="memory", rounds=1),
        RunConfig("halda", "homering, Halda (rounds + prefetch)", planner="halda"),
        RunConfig("halda_k1", "homering, Halda with one round (k=1)", planner="halda", rounds=1),
        RunConfig("halda_no_stream", "Halda, no page-cache advice (--no-release)", planner="halda", release=False),
    ]
    if prefill:
        out.append(
            RunConfig("halda_one_batch", "Halda, prompt as one batch", planner="halda", batch=max(batch, prompt_tokens))
        )
    if release:
        k = next((d for d in range(2, n_layers + 1) if n_layers % d == 0), None)
        if k is not None:
            out += [
                RunConfig("halda_release", f"Halda k={k}, --release", planner="halda", rounds=k, release=True),
                RunConfig("halda_no_release", f"Halda k={k}, --no-release", planner="halda", rounds=k, release=False),
            ]
    return out


def select_configs(configs: list[RunConfig], keys: list[str] | None) -> list[RunConfig]:
    """The ``configs`` whose key is in ``keys``, in the benchmark's order (all of them for None).

    Raises:
        HomeringError: a key that names no run.
    """
    if keys is None:
        return configs
    unknown = sorted(set(keys) - {c.key for c in configs})
    if unknown:
        raise HomeringError(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(c.key for c in configs)}")
    return [c for c in configs if c.key in keys]


def bench_configs(
    model_path: Path, *, batch: int, prompt_tokens: int, keys: list[str] | None, peers: list[str]
) -> list[RunConfig]:
    """The runs of the benchmark on ``model_path`` (the ``peers``' runs last) that ``keys`` selects (all of them
    for None)."""
    from homering.models.gguf_info import inspect_gguf

    n_layers = inspect_gguf(model_path).n_layers
    configs = default_configs(prefill=True, release=True, batch=batch, prompt_tokens=prompt_tokens, n_layers=n_layers)
    configs += [RunConfig(k, PEER_RUNS[k][1], peer=True) for k in peer_run_keys(peers)]
    return select_configs(configs, keys)

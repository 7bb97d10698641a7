"""``homering bench cluster``: the paper's headline on an emulated home cluster.

In one invocation, on one testbed (:mod:`homering.testbed`), with the same prompt:

- ``single``: plain llama-cpp-python with the whole model on the largest device alone, under that device's
  cgroup limits (llama.cpp's baseline in PRIMA.CPP, Table 3);
- ``memory``: homering with ``--planner memory`` (exo's split by memory) and k = 1;
- ``halda``: homering with the Halda plan, its rounds and prefetching;
- ``halda_k1``: Halda limited to one round; ``halda_no_stream``: the Halda plan with no page-cache advice
  (``--no-release``: an overflowing device leaves its windows to the kernel instead of streaming the layers
  it cannot keep);
- ``halda_one_batch`` (with ``prefill``): the Halda plan again, the prompt sent as one batch instead of
  micro-batches, for the prefill TTFT comparison;
- ``halda_release``/``halda_no_release`` (with ``release``): the Halda plan with page-cache release forced
  on, and off, on every device;
- with ``--peers prima,rpc``: ``prima``, ``prima_same_windows`` and ``rpc``, the peer systems on the same
  testbed, measured the same way (:mod:`homering.bench.cluster_peers`); a run killed by a device's memory
  limit is ``{"oom": true}``.

Before the runs every device is profiled alone (:mod:`homering.bench.profiles`). Each run starts from a cold
page cache (every file of the model and the devices' windows dropped with ``POSIX_FADV_DONTNEED``), fresh
processes and a fresh broker, waits until the cluster is ready, answers a short warm-up request, then the
measured one: a ``prompt_tokens``-token prompt and ``tokens`` greedy tokens (end-of-generation ignored).

Reported per run: ``ms_per_token`` (decode, the head's mean step after the first token), ``ttft_ms``
(prompt in, first token out, at the head), and ``memory_pressure``: per device, the peak anonymous RSS of
its process (``RssAnon``, sampled every 0.2 s during the measured request) divided by the device's RAM
limit (page cache is not pressure: the kernel can take it back), and ``disk_bytes_per_token``
(:mod:`homering.bench.reads`): each device's disk reads per decoded token against the plan's prediction.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from homering.bench.cluster_peers import PeerRuns, check_peer_runs
from homering.bench.cluster_report import describe_testbed, report, summarize, write_results
from homering.bench.cluster_runs import RunConfig, bench_configs
from homering.bench.disk import WindowDisk
from homering.bench.memory import PeakSampler, drop_page_cache
from homering.bench.peers import peer_binaries
from homering.bench.profiles import profile_devices_alone
from homering.bench.prompt import prompt_ids
from homering.bench.reads import DecodeReads
from homering.client.chat import ask
from homering.client.client import ClusterClient, new_request_id
from homering.client.local import stop_processes
from homering.errors import HomeringError
from homering.transport import mqtt
from homering.wire import GenerateRequest, Sampling
from homering.wire.security import load_key

AGENT_THREADS = 1  # llama.cpp threads per agent: a device's CPU is its cgroup quota, not a thread count


class ClusterBench:
    """Runs the configurations on one testbed and gathers the results.

    Args:
        testbed: an up :class:`homering.testbed.Testbed`.
        model_path: the model file.
        tokens: greedy tokens per measured request; prompt_tokens: prompt length.
        n_ctx: context of every window [default: what the requests need, in steps of 64];
        batch: the prefill micro-batch.
        timeout: seconds to wait for the cluster to be ready (profiling and
            slicing under throttled disks take minutes).
        console: where progress goes.
    """

    def __init__(
        self,
        testbed,
        model_path: Path,
        *,
        tokens: int = 16,
        prompt_tokens: int = 64,
        n_ctx: int | None = None,
        batch: int = 64,
        timeout: float = 1800.0,
        console: Console | None = None,
        log_args: tuple[str, ...] = ("-q",),
    ):
        self.tb = testbed
        self.log_args = log_args  # the agents' and controllers' -v/-q flags (their logs go to ``logs``)
        self.model_path = Path(model_path)
        self.tokens = tokens
        self.prompt = prompt_ids(self.model_path, prompt_tokens)
        need = prompt_tokens + tokens + 8  # the warm-up and the measured request, one at a time
        self.n_ctx = max(n_ctx or 0, -(-need // 64) * 64)  # small: the KV cache is anonymous memory
        self.batch = batch
        self.timeout = timeout
        self.console = console or Console(stderr=True)
        self.logs = Path(testbed.workdir) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.controller_home = Path(testbed.workdir) / "controller" / "home"  # its windows, not the user's cache
        self.disk = WindowDisk(Path(testbed.workdir) / "windows")  # one store on the host (see bench.disk)
        for home in (self.controller_home, *(testbed.home(d) for d in testbed.devices)):
            self.disk.share(home)

    def cold(self) -> None:
        """Drop the model file and the devices' homes (their windows) from the page cache."""
        drop_page_cache([self.model_path, *(self.tb.home(d) for d in self.tb.devices)])

    def _log(self, name: str):
        return open(self.logs / f"{name}.log", "ab")

    def largest_device(self) -> str:
        """The device with the most RAM (the single-device baseline runs there)."""
        return max(self.tb.devices, key=self.tb.memory_limit)

    # ------------------------------------------------------------ runs
    def run_single(self) -> dict:
        """Plain llama-cpp-python on the largest device, under its cgroup limits."""
        dev = self.largest_device()
        self.cold()
        prompt_file = Path(self.tb.workdir) / "prompt.json"
        prompt_file.write_text(json.dumps(self.prompt))
        with self._log(f"single-{dev}") as err:
            proc = self.tb.spawn(
                dev,
                [
                    sys.executable,
                    "-m",
                    "homering.bench.single",
                    "--model",
                    str(self.model_path),
                    "--prompt-file",
                    str(prompt_file),
                    "--tokens",
                    str(self.tokens),
                    "--threads",
                    "1",
                    "--ctx",
                    str(self.n_ctx),
                ],
                stdout=subprocess.PIPE,
                stderr=err,
            )
            with PeakSampler({dev: proc.pid}) as peaks:
                out, _ = proc.communicate(timeout=self.timeout)
        if proc.returncode != 0:
            raise HomeringError(
                f"the single-device baseline failed on {dev} (exit {proc.returncode}); "
                f"see {self.logs / f'single-{dev}.log'}"
            )
        res = json.loads(out.decode().strip().splitlines()[-1])
        return {
            "device": dev,
            "ms_per_token": res["ms_per_token"],
            "ttft_ms": res["ttft_ms"],
            "n_prompt": res["n_prompt"],
            "memory_pressure": {dev: peaks.peak[dev] / self.tb.memory_limit(dev)},
            "rss_anon_bytes": dict(peaks.peak),
        }

    def run_cluster(self, cfg: RunConfig) -> dict:
        """Fresh broker, agents and controller on the testbed; one warm-up and one measured request."""
        self.cold()
        url = self.tb.start_broker()
        with self.disk.run():  # samples the windows' disk use; removes them after the run
            return self._run_processes(cfg, url)

    def _run_processes(self, cfg: RunConfig, url: str) -> dict:
        """Start the agents and the controller of run ``cfg`` and measure; stop them (and the broker) whatever
        happens."""
        procs: list[subprocess.Popen] = []
        agents: dict[str, int] = {}
        try:
            for dev in self.tb.devices:
                with self._log(f"{cfg.key}-{dev}") as log:
                    p = self.tb.spawn(dev, self._agent_argv(cfg, url, dev), stdout=log, stderr=log)
                procs.append(p)
                agents[dev] = p.pid
            with self._log(f"{cfg.key}-controller") as log:
                argv = self._controller_argv(cfg, url, len(agents))
                env = {**os.environ, "HOMERING_HOME": str(self.controller_home)}
                procs.insert(0, self.tb.spawn(None, argv, env=env, stdout=log, stderr=log))
            return asyncio.run(self._measure(cfg, agents))
        finally:
            stop_processes(procs[:1], 10.0)  # the controller first, then the agents
            stop_processes(procs[1:], 10.0)
            self.tb.stop_broker()

    def _agent_argv(self, cfg: RunConfig, url: str, dev: str) -> list[str]:
        """The command line of device ``dev``'s agent in run ``cfg``, on the broker at ``url``."""
        release = [] if cfg.release is None else ["--release" if cfg.release else "--no-release"]
        return [
            *(sys.executable, "-m", "homering", *self.log_args, "agent", "--broker", url, "--name", dev),
            *("--threads", str(AGENT_THREADS), "--host", self.tb.address(dev), *release),
        ]

    def _controller_argv(self, cfg: RunConfig, url: str, n_agents: int) -> list[str]:
        """The command line of the controller in run ``cfg``, on the broker at ``url``.

        Raises:
            HomeringError: ``cfg`` has no planner (the single-device baseline runs no cluster).
        """
        if cfg.planner is None:
            raise HomeringError(f"run {cfg.key!r} has no planner: it is the single-device baseline")
        return [
            *(sys.executable, "-m", "homering", *self.log_args, "controller", "--broker", url),
            *("--model", str(self.model_path), "--agents", str(n_agents), "--ctx", str(self.n_ctx)),
            *("--planner", cfg.planner, "--batch", str(cfg.batch or self.batch)),
            *("--parallel", "1"),  # one request at a time, one KV sequence: as the single-device baseline
            *("--timeout", str(self.timeout)),
            *(["--rounds", str(cfg.rounds)] if cfg.rounds else []),
        ]

    async def _measure(self, cfg: RunConfig, agents: dict[str, int]) -> dict:
        # the testbed's processes inherit this environment, and with it any cluster key
        async with ClusterClient(mqtt.BrokerURL.parse(self.tb.broker_url), key=load_key()) as client:
            await client.wait_ready(self.timeout)
            plan = client.plan
            if plan is None:
                raise HomeringError("the cluster is ready but has no plan")
            warm = GenerateRequest(
                request_id=new_request_id(),
                prompt_token_ids=self.prompt[:8],
                sampling=Sampling(max_tokens=4, temperature=0, ignore_eos=True),
            )
            await ask(client, warm)
            req = GenerateRequest(
                request_id=new_request_id(),
                prompt_token_ids=self.prompt,
                sampling=Sampling(max_tokens=self.tokens, temperature=0, ignore_eos=True),
            )
            reads = DecodeReads(list(agents), self.tb.disk_read_bytes)
            with PeakSampler(agents) as peaks:
                answer = await ask(client, req, on_event=reads.on_event)  # raises HomeringError on an error event
            reads.finish(len(answer.token_ids))
        return {
            "ms_per_token": answer.ms_per_token,
            "ttft_ms": answer.ttft_ms,
            "n_prompt": len(self.prompt),
            "tokens": len(answer.token_ids),
            "memory_pressure": {d: peaks.peak[d] / self.tb.memory_limit(d) for d in agents},
            "rss_anon_bytes": dict(peaks.peak),
            "predicted_ms_per_token": plan.predicted_ms_per_token,
            "k": plan.k,
            "batch": plan.n_batch,
            "plan": plan.model_dump(),
            "disk_bytes_per_token": reads.report(plan.model_dump()),
        }


def _run_one(bench: ClusterBench, cfg: RunConfig, console: Console, peers: PeerRuns | None, runs: dict) -> dict:
    """One run, timed (``wall_s``), its result printed in one line; ``runs``: the runs so far."""
    with console.status(f"{cfg.key}: {cfg.label}…"):
        t0 = time.monotonic()
        if cfg.peer and peers is not None:
            run = peers.run(cfg.key, runs)
        else:
            run = bench.run_single() if cfg.planner is None else bench.run_cluster(cfg)
        run["wall_s"] = time.monotonic() - t0
    if run.get("oom"):
        console.print(f"{cfg.key}: OOM on {', '.join(run['oom_devices'])}")
        return run
    console.print(
        f"{cfg.key}: {run['ms_per_token']:.1f} ms/token, TTFT {run['ttft_ms']:.0f} ms"
        + (f", predicted {run['predicted_ms_per_token']:.1f}" if run.get("predicted_ms_per_token") else "")
    )
    return run


def run_cluster_bench(
    spec_path: Path,
    model: str | None,
    *,
    tokens: int = 16,
    prompt_tokens: int = 64,
    batch: int = 64,
    keys: list[str] | None = None,
    peers: list[str] | None = None,
    out_dir: Path = Path("bench/results"),
    console: Console | None = None,
    log_args: tuple[str, ...] = ("-q",),
) -> dict:
    """Bring the testbed up, run the configurations, print a table, write JSON and a PNG; return the results.

    ``peers`` (``prima``, ``rpc``) adds the peer systems' runs (:mod:`homering.bench.cluster_peers`).
    ``log_args``: the -v/-q flags of its agents and controllers (their logs: the testbed's, till its next up).

    Raises:
        HomeringError: not root on Linux, a bad spec or model, a run that failed, an unknown run key, or a peer
            that is not built or cannot run this selection.
    """
    from homering.models.gguf_info import inspect_gguf
    from homering.models.registry import resolve_model
    from homering.testbed import Testbed, default_workdir, load_spec

    console = console or Console(stderr=True)
    spec = load_spec(spec_path)
    model_name = model or spec.model
    if not model_name:
        raise HomeringError("no --model given and the spec names none")
    bins = peer_binaries(peers or [])
    model_path = resolve_model(model_name)
    configs = bench_configs(model_path, batch=batch, prompt_tokens=prompt_tokens, keys=keys, peers=peers or [])
    check_peer_runs([c.key for c in configs], model_path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"cluster-{Path(spec_path).stem}-{stamp}.json"
    results: dict = {
        "spec": str(spec_path),
        **{"model": str(model_path), "model_name": model_name},
        "moe": inspect_gguf(model_path).n_expert > 0,  # issue 23's targets (summarize)
        **{"tokens": tokens, "prompt_tokens": prompt_tokens, "batch": batch},
        **{"peers": peers or [], "started": stamp, "runs": {}},
    }
    with Testbed(spec, workdir=default_workdir(spec)) as tb:
        tb.up()
        results["testbed"] = describe_testbed(tb)
        bench = ClusterBench(
            tb, model_path, tokens=tokens, prompt_tokens=prompt_tokens, batch=batch, console=console, log_args=log_args
        )
        results["profiles"] = profile_devices_alone(tb, model_path, threads=AGENT_THREADS, console=console)
        peer_runs = PeerRuns(bench, bins) if bins else None
        for cfg in configs:
            results["runs"][cfg.key] = _run_one(bench, cfg, console, peer_runs, results["runs"])
            write_results(results, out.with_suffix(".partial.json"))
        results["peak_window_bytes"] = bench.disk.peak_bytes
    results["summary"] = summarize(results)
    report(results, out, console)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    return results

"""``homering bench cluster``: the paper's headline on an emulated home cluster.

In one invocation, on one testbed (:mod:`homering.testbed`), with the same
prompt:

- ``single``: plain llama-cpp-python with the whole model on the largest
  device alone, under that device's cgroup limits (llama.cpp's baseline in
  PRIMA.CPP, Table 3);
- ``memory``: homering with ``--planner memory`` (exo's split by memory) and
  k = 1;
- ``halda``: homering with the Halda plan, its rounds and prefetching;
- ``halda_one_batch`` (with ``prefill``): the Halda plan again, the prompt sent
  as one batch instead of micro-batches, for the prefill TTFT comparison;
- ``halda_release``/``halda_no_release`` (with ``release``): the Halda plan
  with page-cache release forced on, and off, on every device.

Each run starts from a cold page cache (every file of the model and the
devices' windows dropped with ``POSIX_FADV_DONTNEED``), fresh processes and a
fresh broker, waits until the cluster is ready, answers a short warm-up
request, then the measured one: a ``prompt_tokens``-token prompt and
``tokens`` greedy tokens (end-of-generation ignored).

Reported per run: ``ms_per_token`` (decode, the head's mean step after the
first token), ``ttft_ms`` (prompt in, first token out, at the head), and
``memory_pressure``: per device, the peak anonymous RSS of its process
(``RssAnon``, sampled every 0.2 s during the measured request) divided by
the device's RAM limit. Page cache is not pressure: the kernel can take it back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from homering.client.chat import ask
from homering.transport import mqtt
from homering.client.client import ClusterClient, new_request_id
from homering.client.local import stop_processes
from homering.wire import GenerateRequest, Sampling
from homering.wire.security import load_key
from homering.engine.pages import WindowPages
from homering.errors import HomeringError

PROMPT_TEXT = (
    "The history of the home computer is a story of machines that grew smaller and cheaper while their "
    "owners found ever more uses for them. In the beginning a computer filled a room and needed a team of "
    "engineers; a few decades later it sat on a desk, and then in a pocket. Each step brought new people "
    "to computing: hobbyists who soldered their own boards, students who wrote their first programs, "
    "families who played games and wrote letters, and finally everyone with a phone. "
)


def prompt_ids(model_path: Path, n: int) -> list[int]:
    """``n`` token ids of a fixed English text (BOS first), with the model's own tokenizer.

    Raises:
        HomeringError: n < 2.
    """
    from homering.engine.tokenizer import Tokenizer

    if n < 2:
        raise HomeringError("--prompt-tokens must be at least 2")
    tok = Tokenizer(model_path)
    try:
        ids = tok.tokenize(PROMPT_TEXT, add_special=True)
        while len(ids) < n:
            ids += tok.tokenize(PROMPT_TEXT, add_special=False)
    finally:
        tok.close()
    return ids[:n]


def rss_anon(pid: int) -> int:
    """Anonymous resident memory of a process, bytes (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakSampler:
    """Samples the ``RssAnon`` of some processes every ``interval`` s in a thread; keeps each one's peak."""

    def __init__(self, pids: dict[str, int], interval: float = 0.2):
        self.pids = pids
        self.interval = interval
        self.peak = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_anon(pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def drop_page_cache(paths: list[Path]) -> None:
    """Drop every regular file under ``paths`` from the page cache (:meth:`WindowPages.release`)."""
    for root in paths:
        for p in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
            try:
                pages = WindowPages(p)
            except OSError:
                continue
            try:
                pages.release()
            finally:
                pages.close()


@dataclass
class RunConfig:
    """One measured run of the cluster (``planner`` None: the single-device baseline)."""

    key: str
    label: str
    planner: str | None = None
    rounds: int | None = None
    batch: int | None = None
    release: bool | None = None


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

    def __init__(self, testbed, model_path: Path, *, tokens: int = 16, prompt_tokens: int = 256,
                 n_ctx: int | None = None,
                 batch: int = 64, timeout: float = 1800.0, console: Console | None = None):
        self.tb = testbed
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

    # ------------------------------------------------------------ helpers
    def _cold(self) -> None:
        drop_page_cache([self.model_path, *(self.tb.home(d) for d in self.tb.devices)])

    def _log(self, name: str):
        return open(self.logs / f"{name}.log", "ab")

    def largest_device(self) -> str:
        return max(self.tb.devices, key=self.tb.memory_limit)

    # ------------------------------------------------------------ runs
    def run_single(self) -> dict:
        """Plain llama-cpp-python on the largest device, under its cgroup limits."""
        dev = self.largest_device()
        self._cold()
        prompt_file = Path(self.tb.workdir) / "prompt.json"
        prompt_file.write_text(json.dumps(self.prompt))
        with self._log(f"single-{dev}") as err:
            proc = self.tb.spawn(dev, [sys.executable, "-m", "homering.bench.single", "--model",
                                       str(self.model_path), "--prompt-file", str(prompt_file), "--tokens",
                                       str(self.tokens), "--threads", "1", "--ctx", str(self.n_ctx)],
                                 stdout=subprocess.PIPE, stderr=err)
            with PeakSampler({dev: proc.pid}) as peaks:
                out, _ = proc.communicate(timeout=self.timeout)
        if proc.returncode != 0:
            raise HomeringError(f"the single-device baseline failed on {dev} (exit {proc.returncode}); "
                                f"see {self.logs / f'single-{dev}.log'}")
        res = json.loads(out.decode().strip().splitlines()[-1])
        return {"device": dev, "ms_per_token": res["ms_per_token"], "ttft_ms": res["ttft_ms"],
                "n_prompt": res["n_prompt"],
                "memory_pressure": {dev: peaks.peak[dev] / self.tb.memory_limit(dev)},
                "rss_anon_bytes": dict(peaks.peak)}

    def run_cluster(self, cfg: RunConfig) -> dict:
        """Fresh broker, agents and controller on the testbed; one warm-up and one measured request."""
        self._cold()
        url = self.tb.start_broker()
        procs: list[subprocess.Popen] = []
        agents: dict[str, int] = {}
        try:
            for dev in self.tb.devices:
                release = [] if cfg.release is None else ["--release" if cfg.release else "--no-release"]
                with self._log(f"{cfg.key}-{dev}") as log:
                    p = self.tb.spawn(dev, [sys.executable, "-m", "homering", "-q", "agent", "--broker", url,
                                            "--name", dev, "--threads", "1", "--host", self.tb.address(dev),
                                            *release], stdout=log, stderr=log)
                procs.append(p)
                agents[dev] = p.pid
            with self._log(f"{cfg.key}-controller") as log:
                procs.insert(0, self.tb.spawn(None, [
                    sys.executable, "-m", "homering", "-q", "controller", "--broker", url,
                    "--model", str(self.model_path), "--agents", str(len(agents)), "--ctx", str(self.n_ctx),
                    "--planner", cfg.planner, "--batch", str(cfg.batch or self.batch),
                    "--parallel", "1",  # one request at a time, one KV sequence: as the single-device baseline
                    "--timeout", str(self.timeout), *(["--rounds", str(cfg.rounds)] if cfg.rounds else [])],
                    stdout=log, stderr=log))
            return asyncio.run(self._measure(cfg, agents))
        finally:
            stop_processes(procs[:1], 10.0)   # the controller first, then the agents
            stop_processes(procs[1:], 10.0)
            self.tb.stop_broker()

    async def _measure(self, cfg: RunConfig, agents: dict[str, int]) -> dict:
        # the testbed's processes inherit this environment, and with it any cluster key
        async with ClusterClient(mqtt.BrokerURL.parse(self.tb.broker_url), key=load_key()) as client:
            await client.wait_ready(self.timeout)
            plan = client.plan
            warm = GenerateRequest(request_id=new_request_id(), prompt_token_ids=self.prompt[:8],
                                   sampling=Sampling(max_tokens=4, temperature=0, ignore_eos=True))
            await ask(client, warm)
            req = GenerateRequest(request_id=new_request_id(), prompt_token_ids=self.prompt,
                                  sampling=Sampling(max_tokens=self.tokens, temperature=0, ignore_eos=True))
            with PeakSampler(agents) as peaks:
                answer = await ask(client, req)  # raises HomeringError on an error event
        return {"ms_per_token": answer.ms_per_token, "ttft_ms": answer.ttft_ms,
                "n_prompt": len(self.prompt), "tokens": len(answer.token_ids),
                "memory_pressure": {d: peaks.peak[d] / self.tb.memory_limit(d) for d in agents},
                "rss_anon_bytes": dict(peaks.peak),
                "predicted_ms_per_token": plan.predicted_ms_per_token, "k": plan.k,
                "batch": plan.n_batch, "plan": plan.model_dump()}


def default_configs(*, prefill: bool, release: bool, batch: int, prompt_tokens: int,
                    n_layers: int) -> list[RunConfig]:
    """The runs of the benchmark, in order.

    The release runs use the smallest k > 1 that divides ``n_layers``: with
    one round a device has one window, needed again at every token, and
    ``--release`` does nothing.
    """
    out = [RunConfig("single", "llama-cpp-python, largest device"),
           RunConfig("memory", "homering, memory planner, k=1", planner="memory", rounds=1),
           RunConfig("halda", "homering, Halda (rounds + prefetch)", planner="halda")]
    if prefill:
        out.append(RunConfig("halda_one_batch", "Halda, prompt as one batch", planner="halda",
                             batch=max(batch, prompt_tokens)))
    if release:
        k = next((d for d in range(2, n_layers + 1) if n_layers % d == 0), None)
        if k is not None:
            out += [RunConfig("halda_release", f"Halda k={k}, --release", planner="halda", rounds=k, release=True),
                    RunConfig("halda_no_release", f"Halda k={k}, --no-release", planner="halda", rounds=k,
                              release=False)]
    return out


def summarize(results: dict) -> dict:
    """Ratios and target checks of the headline runs (missing runs give None)."""
    r = results["runs"]
    single, memory, halda = (r.get(k) for k in ("single", "memory", "halda"))
    out: dict = {}
    if single and halda:
        out["halda_speedup_vs_single"] = single["ms_per_token"] / halda["ms_per_token"]
        out["target_5x_single"] = out["halda_speedup_vs_single"] >= 5
    if memory and halda:
        out["halda_speedup_vs_memory"] = memory["ms_per_token"] / halda["ms_per_token"]
        out["target_faster_than_memory"] = halda["ms_per_token"] < memory["ms_per_token"]
    if halda:
        pred = halda.get("predicted_ms_per_token")
        if pred:
            out["prediction_error"] = (pred - halda["ms_per_token"]) / halda["ms_per_token"]
            out["target_prediction_25pct"] = abs(out["prediction_error"]) <= 0.25
        worst = max((v for run in (single, memory, halda) if run for v in run["memory_pressure"].values()),
                    default=None)
        out["max_memory_pressure"] = worst
        out["target_pressure_10pct"] = worst is not None and worst <= 0.10
    one = r.get("halda_one_batch")
    if one and halda:
        out["prefill_ttft_micro_over_one_batch"] = halda["ttft_ms"] / one["ttft_ms"]
    rel, norel = r.get("halda_release"), r.get("halda_no_release")
    if rel and norel:
        out["release_ms_per_token_ratio"] = rel["ms_per_token"] / norel["ms_per_token"]
    return out


def table(results: dict) -> Table:
    t = Table(title=f"bench cluster: {Path(results['model']).name} on {results['spec']}")
    for col in ("run", "ms/token", "predicted", "TTFT ms", "k", "max pressure"):
        t.add_column(col, justify="right")
    for key, run in results["runs"].items():
        pred = run.get("predicted_ms_per_token")
        t.add_row(key, f"{run['ms_per_token']:.1f}", f"{pred:.1f}" if pred else "-", f"{run['ttft_ms']:.0f}",
                  str(run.get("k", "-")), f"{max(run['memory_pressure'].values()):.1%}")
    return t


def chart(results: dict, path: Path) -> Path:
    """A PNG with two bar charts: decode ms/token and TTFT per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in ((axes[0], "ms_per_token", "decode, ms/token (lower is better)"),
                              (axes[1], "ttft_ms", "TTFT, ms (lower is better)")):
        vals = [results["runs"][k][metric] for k in keys]
        bars = ax.bar(keys, vals, color=["#888" if k == "single" else "#4a7" for k in keys])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    if "halda" in results["runs"] and results["runs"]["halda"].get("predicted_ms_per_token"):
        axes[0].axhline(results["runs"]["halda"]["predicted_ms_per_token"], ls="--", color="k", lw=0.8,
                        label="Halda's prediction")
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{Path(results['model']).name} on {Path(results['spec']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_cluster_bench(spec_path: Path, model: str | None, *, tokens: int = 16, prompt_tokens: int = 256,
                      batch: int = 64, keys: list[str] | None = None, out_dir: Path = Path("bench/results"),
                      console: Console | None = None) -> dict:
    """Bring the testbed up, run the configurations, print a table, write JSON and a PNG; return the results.

    Raises:
        HomeringError: not root on Linux, a bad spec or model, a run that failed, or an unknown run key.
    """
    from homering.models.registry import resolve_model
    from homering.testbed import Testbed, default_workdir, load_spec

    console = console or Console(stderr=True)
    spec = load_spec(spec_path)
    model_name = model or spec.model
    if not model_name:
        raise HomeringError("no --model given and the spec names none")
    model_path = resolve_model(model_name)
    from homering.models.gguf_info import inspect_gguf

    configs = default_configs(prefill=True, release=True, batch=batch, prompt_tokens=prompt_tokens,
                              n_layers=inspect_gguf(model_path).n_layers)
    if keys is not None:
        unknown = sorted(set(keys) - {c.key for c in configs})
        if unknown:
            raise HomeringError(f"unknown run(s) {', '.join(unknown)}; choose from "
                                f"{', '.join(c.key for c in configs)}")
        configs = [c for c in configs if c.key in keys]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict = {"spec": str(spec_path), "model": str(model_path), "model_name": model_name,
                     "tokens": tokens, "prompt_tokens": prompt_tokens, "batch": batch, "started": stamp,
                     "runs": {}}
    with Testbed(spec, workdir=default_workdir(spec)) as tb:
        tb.up()
        results["testbed"] = {"shaping": tb.shaping, "warnings": tb.warnings,
                              "devices": {d: tb.describe(d) for d in tb.devices}}
        bench = ClusterBench(tb, model_path, tokens=tokens, prompt_tokens=prompt_tokens, batch=batch,
                             console=console)
        for cfg in configs:
            with console.status(f"{cfg.key}: {cfg.label}…"):
                t0 = time.monotonic()
                run = bench.run_single() if cfg.planner is None else bench.run_cluster(cfg)
                run["wall_s"] = time.monotonic() - t0
            results["runs"][cfg.key] = run
            console.print(f"{cfg.key}: {run['ms_per_token']:.1f} ms/token, TTFT {run['ttft_ms']:.0f} ms"
                          + (f", predicted {run['predicted_ms_per_token']:.1f}"
                             if run.get("predicted_ms_per_token") else ""))
    results["summary"] = summarize(results)
    console.print(table(results))
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"cluster-{Path(spec_path).stem}-{stamp}.json"
    out.write_text(json.dumps(results, indent=2))
    png = chart(results, out.with_suffix(".png"))
    console.print(f"wrote {out} and {png}")
    return results

"""``homering bench faults``: a soak test of fault tolerance on the emulated home cluster.

An emulated cluster (:class:`~homering.testbed.Testbed`: one network namespace
and cgroup per device) runs a broker, a controller and one agent per device.
The first pass sends every prompt once, with no fault, and keeps the greedy
answers. Then ``requests`` greedy requests flow (``concurrency`` at a time)
while an agent chosen at random is SIGKILLed every ``kill_every`` seconds and
started again ``restart_after`` seconds later (it rejoins at a request
boundary). Reported:

- requests completed, garbled (tokens differ from the fault-free answer) and failed;
- the recovery pause of every kill: the longest gap between consecutive tokens
  (of any request) from the last token before the kill until the next kill or
  restart, at most 30 s later; p50 and p95 over the kills.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from homering import paths
from homering.bench import write_json
from homering.bench.concurrent import PROMPTS
from homering.client.client import ClusterClient, new_request_id
from homering.client.local import stop_processes
from homering.errors import HomeringError
from homering.transport.mqtt import BrokerURL
from homering.wire import EventType, GenerateRequest, Sampling

PAUSE_WINDOW_S = 30.0


def _percentile(xs: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (with few samples, p95 is the largest)."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def pauses(token_times: list[float], events: list[tuple[float, str]]) -> list[float]:
    """The recovery pause of every kill, seconds.

    Args:
        token_times: when each token of any request arrived (monotonic seconds).
        events: ``(time, "kill" | "restart")``, any order.

    Returns:
        For each kill at time k: the longest gap between consecutive token
        arrivals, from the last one before k, among arrivals up to the next
        event or k + :data:`PAUSE_WINDOW_S`; when no token arrived in that
        window, the window's length.
    """
    times = sorted(token_times)
    evs = sorted(events)
    out = []
    for i, (k, kind) in enumerate(evs):
        if kind != "kill":
            continue
        end = min([t for t, _ in evs[i + 1 :]] + [k + PAUSE_WINDOW_S])
        before = [t for t in times if t <= k]
        inside = [t for t in times if k < t <= end]
        if not inside:
            out.append(end - (before[-1] if before else k))
            continue
        seq = ([before[-1]] if before else [k]) + inside
        out.append(max(b - a for a, b in zip(seq, seq[1:], strict=False)))
    return out


class _Soak:
    def __init__(self, tb, model_path: Path, *, agents: int, n_tokens: int, threads: int, console: Console):
        self.tb = tb
        self.model_path = model_path
        self.n_agents = agents
        self.n_tokens = n_tokens
        self.threads = threads
        self.console = console
        self.agents: dict[str, subprocess.Popen] = {}  # device -> its agent
        self.procs: list = []
        self.token_times: list[float] = []
        self.events: list[tuple[float, str]] = []
        # the agents share this machine's home (profiles, windows): no disk probe and no slicing per device
        self.env = {**os.environ, "HOMERING_HOME": str(paths.home())}

    def start_agent(self, dev: str) -> None:
        p = self.tb.spawn_logged(
            dev,
            [
                sys.executable,
                "-m",
                "homering",
                "agent",
                "--broker",
                self.url,
                "--name",
                dev,
                "--threads",
                str(self.threads),
                "--host",
                self.tb.address(dev),
            ],
            dev,
            env=self.env,
        )
        self.agents[dev] = p
        self.procs.append(p)

    def start(self) -> BrokerURL:
        self.url = self.tb.start_broker()
        self.procs.append(
            self.tb.spawn_logged(
                None,
                [
                    sys.executable,
                    "-m",
                    "homering",
                    "controller",
                    "--broker",
                    self.url,
                    "--model",
                    str(self.model_path),
                    "--agents",
                    str(self.n_agents),
                    "--ctx",
                    "512",
                    "--planner",
                    "proportional",
                    "--parallel",
                    "4",
                ],
                "controller",
            )
        )
        for dev in self.tb.devices:
            self.start_agent(dev)
        return BrokerURL.parse(self.url)

    async def ask(self, client: ClusterClient, prompt: str) -> tuple[list[int] | None, str | None]:
        req = GenerateRequest(
            request_id=new_request_id(),
            prompt=prompt,
            sampling=Sampling(max_tokens=self.n_tokens, temperature=0, ignore_eos=True),
        )
        async for ev in client.generate(req, timeout=120):
            if ev.type == EventType.TOKEN:
                self.token_times.append(time.monotonic())
            elif ev.type == EventType.DONE:
                return ev.token_ids, None
            elif ev.type == EventType.ERROR:
                return None, ev.error
        return None, "the stream ended without done"

    async def killer(self, every: float, restart_after: float, rng: random.Random) -> None:
        while True:
            await asyncio.sleep(every)
            alive = [d for d, p in self.agents.items() if p.poll() is None]
            if len(alive) < 2:
                continue
            dev = rng.choice(alive)
            os.kill(self.agents[dev].pid, signal.SIGKILL)
            self.events.append((time.monotonic(), "kill"))
            self.console.log(f"killed agent {dev}")
            asyncio.get_running_loop().call_later(restart_after, self._restart, dev)

    def _restart(self, dev: str) -> None:
        if self.agents[dev].poll() is not None:
            self.start_agent(dev)
            self.events.append((time.monotonic(), "restart"))
            self.console.log(f"restarted agent {dev}")


def _first_difference(got: list[int], want: list[int]) -> int:
    """The first position where two token lists differ (the shorter one's length when it is a prefix)."""
    return next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))


@dataclass(frozen=True)
class SoakLoad:
    """The load and the faults of a soak: ``requests`` greedy requests, ``concurrency`` at a time, while an
    agent is SIGKILLed every ``kill_every`` s and started again ``restart_after`` s later; ``seed`` seeds the
    choice of victims."""

    requests: int
    concurrency: int
    kill_every: float
    restart_after: float
    seed: int


async def _soak(soak: _Soak, broker: BrokerURL, load: SoakLoad) -> dict:
    """The fault-free pass, then the requests under kills; the counts, pauses and timeline of the soak."""
    async with ClusterClient(broker) as client:
        await client.wait_ready(600)
        expected = await _fault_free_answers(soak, client)
        soak.token_times.clear()
        counter = iter(range(load.requests))
        results: list[dict] = []

        async def worker() -> None:
            for i in counter:
                prompt = PROMPTS[i % len(PROMPTS)]
                t0 = time.monotonic()
                ids, err = await soak.ask(client, prompt)
                results.append(_request_record(i, ids, err, expected[prompt], t0))

        killer = asyncio.create_task(soak.killer(load.kill_every, load.restart_after, random.Random(load.seed)))
        t0 = time.monotonic()
        try:
            await asyncio.gather(*(worker() for _ in range(load.concurrency)))
        finally:
            killer.cancel()
        wall = time.monotonic() - t0
    return _soak_results(soak, results, requests=load.requests, t0=t0, wall=wall)


async def _fault_free_answers(soak: _Soak, client: ClusterClient) -> dict[str, list[int]]:
    """Every prompt's greedy answer with no fault (token ids by prompt).

    Raises:
        HomeringError: a request failed.
    """
    expected = {}
    for p in PROMPTS:
        ids, err = await soak.ask(client, p)
        if ids is None:
            raise HomeringError(f"the fault-free pass failed: {err}")
        expected[p] = ids
    return expected


def _request_record(i: int, ids: list[int] | None, err: str | None, want: list[int], t0: float) -> dict:
    """Request ``i``'s line in the results: its answer ``ids`` (None: failed with ``err``) against the
    fault-free ``want``, sent at ``t0`` (monotonic seconds)."""
    garbled = ids is not None and ids != want
    return {
        "i": i,
        "ok": ids is not None,
        "garbled": garbled,
        "error": err,
        "wall_s": time.monotonic() - t0,
        "t0": t0,
        "first_difference": _first_difference(ids, want) if ids is not None and garbled else None,
    }


def _soak_results(soak: _Soak, results: list[dict], *, requests: int, t0: float, wall: float) -> dict:
    """The soak's counts, recovery pauses (p50, p95, max) and timeline, from its requests' ``results``."""
    ps = pauses(soak.token_times, soak.events)
    return {
        "requests": requests,
        "completed": sum(r["ok"] for r in results),
        "garbled": sum(r["garbled"] for r in results),
        "failed": sum(not r["ok"] for r in results),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "kills": sum(1 for _, k in soak.events if k == "kill"),
        "wall_s": wall,
        "pause_s": ps,
        "pause_p50_s": _percentile(ps, 0.5),
        "pause_p95_s": _percentile(ps, 0.95),
        "pause_max_s": max(ps) if ps else None,
        "garbled_requests": [r for r in results if r["garbled"]],
        "timeline": {"t0": t0, "tokens": soak.token_times, "events": soak.events},
    }


def run_faults_bench(
    model_path: Path,
    *,
    agents: int = 4,
    requests: int = 100,
    concurrency: int = 1,
    kill_every: float = 10.0,
    restart_after: float = 5.0,
    n_tokens: int = 32,
    threads: int = 1,
    seed: int = 0,
    out: str | Path = "bench-results/faults.json",
    workdir: Path | None = None,
    console: Console | None = None,
) -> dict:
    """Run the soak test on a fresh testbed, print a table, write JSON to ``out``; return the results.

    Raises:
        HomeringError: not root / no iproute2 (the testbed), or the cluster did not come up.
    """
    from homering.testbed import Testbed, parse_spec

    console = console or Console(stderr=True)
    load = SoakLoad(requests, concurrency, kill_every, restart_after, seed)
    name = f"faults-{uuid.uuid4().hex[:6]}"
    spec = parse_spec({"name": name, "devices": [{"name": f"d{i}", "ram": "1GiB", "cpus": 1} for i in range(agents)]})
    workdir = Path(workdir or Path(tempfile.gettempdir()) / f"homering-{name}")
    with Testbed(spec, workdir=workdir) as tb:
        soak = _Soak(tb, model_path, agents=agents, n_tokens=n_tokens, threads=threads, console=console)
        try:
            broker = soak.start()
            with console.status(f"{requests} requests, a kill every {kill_every:g} s…"):
                results = asyncio.run(_soak(soak, broker, load))
        finally:
            stop_processes(soak.procs, 10.0)
            tb.stop_broker()
    shutil.rmtree(workdir / "devices", ignore_errors=True)  # the devices' homes; the logs stay
    results.update(
        {
            "model": str(model_path),
            "agents": agents,
            "concurrency": concurrency,
            "tokens": n_tokens,
            "kill_every_s": kill_every,
            "restart_after_s": restart_after,
            "threads": threads,
            "logs": str(workdir / "logs"),
        }
    )
    Console().print(_faults_table(results, model_path, agents=agents, load=load))
    write_json(results, out, console)
    return results


def _faults_table(results: dict, model_path: Path, *, agents: int, load: SoakLoad) -> Table:
    """One row: requests, completed, garbled, failed, kills and the recovery pause's p50, p95 and max."""
    table = Table(
        title=f"faults: {Path(model_path).name}, {agents} agents, a kill every {load.kill_every:g} s "
        f"(restart after {load.restart_after:g} s)"
    )
    for col in ("requests", "completed", "garbled", "failed", "kills", "pause p50 s", "pause p95 s", "pause max s"):
        table.add_column(col, justify="right")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    table.add_row(
        str(load.requests),
        str(results["completed"]),
        str(results["garbled"]),
        str(results["failed"]),
        str(results["kills"]),
        fmt(results["pause_p50_s"]),
        fmt(results["pause_p95_s"]),
        fmt(results["pause_max_s"]),
    )
    return table

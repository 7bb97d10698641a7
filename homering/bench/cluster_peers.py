"""The peer systems' runs of ``homering bench cluster --peers prima,rpc``, on the same testbed as homering's.

Each run starts from a cold page cache, with homering's prompt (its token ids turned back into text; the peer
tokenizes it again and adds BOS: ``n_prompt`` says how many tokens it saw) and the same number of greedy tokens,
one process per device in that device's network namespace and cgroups (:meth:`Testbed.spawn`), 1 thread each:

- ``prima``: prima.cpp (arXiv 2504.08791) with its own Halda plan: no ``-lw``, so every rank profiles its
  device (CPU, memory as :func:`device_memory_view` shows it, and the disk with fio in a scratch folder) and
  rank 0 plans (``prima_plan``; a rank it drops exits before generating, at pressure 0). Ranks: rank 0 on the
  head (homering's: the device with the most RAM), the others by name. ``--prefetch`` on every rank, as its
  README deploys it. Its profiler refuses some weight types (:data:`~homering.bench.peers.PRIMA_PROFILED_TYPES`).
- ``prima_same_windows``: prima.cpp with the layer windows of the ``halda`` run's plan (``-lw``, no profiling),
  which compares the two runtimes on one plan (:func:`prima_windows`).
- ``rpc``: llama.cpp RPC, a ``ggml-rpc-server`` on every device (``-H 0.0.0.0``) and ``llama-completion`` on
  the head with ``--rpc`` (the servers in ring order, the head's last) and ``-ngl 99``. Every server reports the
  host's memory, so ``--tensor-split`` gives the split a real cluster would get: in proportion to each device's
  RAM limit. Its weights sit in the servers' anonymous memory: a share over a device's limit gets the process
  OOM-killed, reported as ``{"oom": true}`` (the cgroup's ``oom_kill`` count rose, or a process died of
  SIGKILL on its own).

There is no warm-up request (the prompt's forward pass reads every weight before the first decode step).
Reported as homering's runs are: ``ms_per_token`` (rank 0's / the client's ``eval time`` line: the mean decode
step after the first token), ``ttft_ms`` (the ``prompt eval time`` line: the forward pass over the prompt, whose
last logits give the first token; sampling it is not included, well under a millisecond) and
``memory_pressure`` (device → peak ``RssAnon`` of the device's peer processes during generation, from
llama.cpp's ``sampler chain`` line to the end, the server and the client summed on the rpc head, over its RAM
limit; :class:`~homering.bench.memory.PeakSampler`; for an OOM run, from the start until the kill).

What prima.cpp's profiler sees of memory: it reads the memory files at the root of the cgroup mount, never the
device's own cgroup, and so would see the host's RAM and plan for it (on home4, 15 of 16 layers on the
281 MiB phone); :func:`device_memory_view` shows it the device's instead. ``prima_seen_ram_gib`` records what
it saw.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from homering.bench.memory import PeakSampler
from homering.bench.peers import (
    eval_ms_per_token,
    prima_own_plan,
    prima_refused_types,
    prima_seen_ram_gib,
    prompt_eval,
)
from homering.bench.prompt import prompt_text
from homering.client.local import stop_processes
from homering.errors import HomeringError

if TYPE_CHECKING:
    from homering.bench.cluster import ClusterBench

PEER_RUNS = {
    "prima": ("prima", "prima.cpp, its own Halda plan"),
    "prima_same_windows": ("prima", "prima.cpp, homering's Halda windows (-lw)"),
    "rpc": ("rpc", "llama.cpp RPC, a server per device"),
}
"""Run key → (the peer of ``--peers`` that adds it, its label)."""

PRIMA_DATA_PORT, PRIMA_SIGNAL_PORT, RPC_PORT = 29000, 29100, 50052
POLL_S = 0.5
GENERATING = "sampler chain:"  # llama.cpp logs it when loading is over and generation starts
PRIMA_MEMORY_VIEW = (
    "prima.cpp's profiler reads the memory limit and usage at the root of the cgroup mount, never the device's "
    "cgroup; each rank ran in a private mount namespace where those files are its device's (prima_seen_ram_gib "
    "is what its profiler saw, device_ram_gib the devices' limits)"
)
_VIEW_SH = (
    'cg="$1"; shift; back="$PWD"; '
    'if [ -e "$cg/memory.max" ]; then lim=memory.max; use=memory.current; '
    "else lim=memory.limit_in_bytes; use=memory.usage_in_bytes; fi; "
    'cd "$cg" && mount -t tmpfs memory-view /sys/fs/cgroup && mkdir /sys/fs/cgroup/memory '
    "&& touch /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory.current "
    "&& mount -c --bind . /sys/fs/cgroup/memory "
    '&& mount -c --bind "$lim" /sys/fs/cgroup/memory.max && mount -c --bind "$use" /sys/fs/cgroup/memory.current '
    '&& cd "$back" && exec "$@"'
)


def peer_run_keys(peers: list[str]) -> list[str]:
    """The run keys ``--peers`` adds, in the benchmark's order."""
    return [key for key, (peer, _) in PEER_RUNS.items() if peer in peers]


def check_peer_runs(keys: list[str], model: Path) -> None:
    """Refuse, before any testbed is up, a selection of runs the peers cannot make.

    Raises:
        HomeringError: ``prima_same_windows`` without ``halda`` (whose plan it runs), or ``prima`` on a model
            with weight types prima.cpp's profiler refuses.
    """
    if "prima_same_windows" in keys and "halda" not in keys:
        raise HomeringError("the prima_same_windows run needs the halda run's plan: select halda as well")
    if "prima" in keys and (bad := prima_refused_types(model)):
        raise HomeringError(
            f"prima.cpp's profiler refuses {', '.join(bad)} weights: use a K-quant model (e.g. *-q4_k_m), "
            "or leave the prima run out (--runs)"
        )


def prima_windows(plan: dict) -> tuple[list[str], list[int]]:
    """prima.cpp's ranks and ``-lw`` for homering's plan (a :class:`~homering.wire.Plan` as a dict).

    In prima.cpp (``this_layer_is_mine`` in its ``src/llama.cpp``) each round's layers go to ranks 1, 2, …,
    n-1 and then rank 0, which also embeds the tokens and samples; homering's head is the ring's last device
    and holds each round's last layers. So rank 0 is ``ring[-1]`` and rank r is ``ring[r-1]``; ``-lw[r]`` is that
    device's layers per round.

    Raises:
        HomeringError: a device whose windows differ in size between rounds (``-lw`` cannot say it).
    """
    ring = plan["ring"]
    ranks = [ring[-1], *ring[:-1]]
    lw = []
    for agent in ranks:
        sizes = {w["end"] - w["start"] for w in agent["windows"]}
        if len(sizes) != 1:
            raise HomeringError(f"{agent['name']}'s windows differ in size between rounds: -lw cannot express it")
        lw.append(sizes.pop())
    return [a["name"] for a in ranks], lw


def prima_layers(n_layers: int, lw: list[int]) -> list[list[tuple[int, int]]]:
    """The layer windows ``[start, end)`` of each rank under ``-lw`` (prima.cpp's ``this_layer_is_mine``: each
    round goes to ranks 1 … n-1, then 0; the last round may be cut short)."""
    out: list[list[tuple[int, int]]] = [[] for _ in lw]
    start, order = 0, [*range(1, len(lw)), 0]
    while start < n_layers:
        for r in order:
            if start >= n_layers:
                break
            end = min(n_layers, start + lw[r])
            if end > start:
                out[r].append((start, end))
            start = end
    return out


def plan_layers(plan: dict) -> dict[str, list[tuple[int, int]]]:
    """Each ring device's layer windows ``[start, end)`` in homering's plan, in layer order."""
    return {a["name"]: sorted((w["start"], w["end"]) for w in a["windows"]) for a in plan["ring"]}


def device_memory_view(memory_cgroup: str, argv: list[str]) -> list[str]:
    """``argv`` in a private mount namespace whose ``/sys/fs/cgroup`` shows the device's memory cgroup at its root:
    ``memory.max``/``memory.current`` (cgroup v2 names) are the device's limit and usage, ``memory/`` is its
    folder (the v1 path), so prima.cpp's profiler sees the device's RAM as it would on a real device (the peers'
    README suggests this). The host's mounts are untouched (``unshare --mount``, private propagation); the
    folder is opened before the mount hides it and bound without canonicalizing (``mount -c``)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", _VIEW_SH, "sh", memory_cgroup, *argv]


class OomWatch:
    """Whether the kernel's OOM killer struck in some devices since it was made.

    Args:
        count: device → its cgroup's ``oom_kill`` count now (:meth:`Testbed.oom_kills`).
        devices: the devices to watch.
    """

    def __init__(self, count: Callable[[str], int], devices: list[str]):
        self.count = count
        self.before = {d: count(d) for d in devices}

    def killed(self, procs: dict[str, subprocess.Popen] | None = None) -> list[str]:
        """The devices whose ``oom_kill`` count rose, or (``procs``: name → process, the name starting with
        its device) where a process died of SIGKILL that this bench did not send; sorted."""
        out = {d for d, n in self.before.items() if self.count(d) > n}
        for name, p in (procs or {}).items():
            if p.returncode == -signal.SIGKILL:
                out.add(next((d for d in sorted(self.before, key=len, reverse=True) if name.startswith(d)), name))
        return sorted(out)


class PeerRuns:
    """The peer runs on a :class:`~homering.bench.cluster.ClusterBench`'s testbed, model and prompt.

    Args:
        bench: the cluster bench (its testbed, model, prompt, tokens, context, timeout, logs, cold cache).
        bins: the peers' binaries (:func:`~homering.bench.peers.peer_binaries`).
        prompt: the prompt's text [default: the bench's prompt ids, detokenized].
    """

    def __init__(self, bench: ClusterBench, bins: dict[str, str], prompt: str | None = None):
        self.bench, self.tb, self.bins = bench, bench.tb, bins
        # BOS is not rendered: the peers add it
        self.prompt = prompt if prompt is not None else prompt_text(bench.model_path, bench.prompt)

    def ranks(self) -> list[str]:
        """prima.cpp's default rank order: rank 0 on the head (the most RAM), the others by name."""
        head = self.bench.largest_device()
        return [head, *sorted(d for d in self.tb.devices if d != head)]

    def run(self, key: str, runs: dict) -> dict:
        """Run ``key`` (of :data:`PEER_RUNS`); ``runs``: the runs so far (``prima_same_windows`` reads
        ``halda``'s plan).

        Raises:
            HomeringError: a run that fails other than by OOM, or no ``halda`` run before ``prima_same_windows``.
        """
        if key == "rpc":
            return self.run_rpc()
        if key == "prima":
            return self.run_prima(self.ranks(), None)
        plan = runs.get("halda", {}).get("plan")
        if not plan:
            raise HomeringError("prima_same_windows needs the halda run's plan: select halda as well")
        ranks, lw = prima_windows(plan)
        out = self.run_prima(ranks, lw)
        mine, theirs = plan_layers(plan), prima_layers(plan["n_layers"], lw)
        out["same_windows"] = all(mine[d] == theirs[r] for r, d in enumerate(ranks))
        return out

    # ------------------------------------------------------------ prima.cpp
    def prima_argv(self, ranks: list[str], rank: int, lw: list[int] | None) -> list[str]:
        """The command line of prima.cpp's rank ``rank`` on device ``ranks[rank]`` (rank 0 carries the prompt,
        the sampling, the context and ``-lw``)."""
        nxt = self.tb.address(ranks[(rank + 1) % len(ranks)])
        argv = [
            *(self.bins["PRIMA_CLI"], "-m", str(self.bench.model_path), "--world", str(len(ranks))),
            *("--rank", str(rank), "--master", self.tb.address(ranks[0]), "--next", nxt),
            *("--data-port", str(PRIMA_DATA_PORT), "--signal-port", str(PRIMA_SIGNAL_PORT), "-t", "1", "--prefetch"),
        ]
        if rank == 0:
            argv += ["-c", str(self.bench.n_ctx), *self._sampling()]
            argv += ["-lw", ",".join(map(str, lw))] if lw else []
        return argv

    def run_prima(self, ranks: list[str], lw: list[int] | None) -> dict:
        """prima.cpp's ring over ``ranks`` (rank r on device ``ranks[r]``), with ``-lw`` or its own plan.

        Raises:
            HomeringError: without ``lw``, a model whose weight types its profiler refuses.
        """
        if lw is None:
            check_peer_runs(["prima"], self.bench.model_path)
        key = "prima" if lw is None else "prima_same_windows"
        scratch = Path(self.tb.workdir) / "peers"  # fio's 1 GiB test files, a folder per device
        argv = {d: self.prima_argv(ranks, r, lw) for r, d in enumerate(ranks)}
        if lw is None:  # it profiles: show it its device's memory
            argv = {d: device_memory_view(self.memory_cgroup(d), a) for d, a in argv.items()}
        workers = [(d, argv[d], scratch / d) for d in reversed(ranks[1:])]
        try:
            out = self._group(key, workers, (ranks[0], argv[ranks[0]], scratch / ranks[0]), [])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        out["ranks"] = ranks
        if lw is not None:
            out["lw"] = lw
        else:
            log = self.tb.log_path(f"{key}-{ranks[0]}").read_text(errors="replace")
            seen = prima_seen_ram_gib(log)
            out["prima_plan"] = prima_own_plan(log, len(ranks))
            out["prima_seen_ram_gib"] = dict(zip(ranks, seen, strict=False))
            out["device_ram_gib"] = {d: self.tb.memory_limit(d) / (1 << 30) for d in ranks}
            out["prima_memory_view"] = PRIMA_MEMORY_VIEW
        return out

    def memory_cgroup(self, device: str) -> str:
        """The folder of the device's memory cgroup (the one with ``memory.max`` or ``memory.limit_in_bytes``).

        Raises:
            HomeringError: the device has none.
        """
        for cg in self.tb.describe(device)["cgroups"]:
            if any((Path(cg) / f).exists() for f in ("memory.max", "memory.limit_in_bytes")):
                return str(cg)
        raise HomeringError(f"device {device!r} has no memory cgroup")

    # ------------------------------------------------------------ llama.cpp RPC
    def rpc_argvs(self) -> tuple[list[str], list[str], list[str]]:
        """``(servers' devices in ring order, a server's argv, the client's argv)``: the head's server takes the
        last layers, as homering's head; ``--tensor-split`` is each device's RAM limit in MiB."""
        ranks = self.ranks()
        ring = [*ranks[1:], ranks[0]]
        server = [self.bins["LLAMACPP_RPC_SERVER"], "-H", "0.0.0.0", "-p", str(RPC_PORT), "-t", "1"]
        split = ",".join(str(self.tb.memory_limit(d) >> 20) for d in ring)
        client = [
            *(self.bins["LLAMACPP_COMPLETION"], "-m", str(self.bench.model_path), "-t", "1"),
            *("--rpc", ",".join(f"{self.tb.address(d)}:{RPC_PORT}" for d in ring)),
            *("-ngl", "99", "--tensor-split", split, "-no-cnv", "-c", str(self.bench.n_ctx), *self._sampling()),
        ]
        return ring, server, client

    def run_rpc(self) -> dict:
        """A ``ggml-rpc-server`` per device and ``llama-completion`` on the head, every layer on the servers."""
        ring, server, client = self.rpc_argvs()
        out = self._group("rpc", [(d, server, None) for d in ring], (ring[-1], client, None), ring)
        out["servers"] = ring
        out["tensor_split_mib"] = client[client.index("--tensor-split") + 1]
        return out

    # ------------------------------------------------------------ processes
    def _sampling(self) -> list[str]:
        return ["-p", self.prompt, "-n", str(self.bench.tokens), "--temp", "0", "--top-k", "1", "-s", "42",
                "--ignore-eos"]  # fmt: skip

    def _spawn(self, name: str, dev: str, argv: list[str], cwd: Path | None) -> subprocess.Popen:
        if cwd is not None:
            cwd.mkdir(parents=True, exist_ok=True)
        self.tb.log_path(name).unlink(missing_ok=True)
        return self.tb.spawn_logged(dev, argv, name, cwd=cwd)

    def _group(self, key: str, background: list, main: tuple, listen: list[str]) -> dict:
        """Start the ``background`` processes (device, argv, cwd), wait until the ``listen`` devices accept on
        :data:`RPC_PORT`, run ``main`` to its end under an :class:`OomWatch`; stop them all whatever happens."""
        self.bench.cold()
        oom = OomWatch(self.tb.oom_kills, self.tb.devices)
        procs: dict[str, subprocess.Popen] = {}
        where: dict[str, str] = {}  # process name (its log's, after the key) → device
        try:
            for dev, argv, cwd in background:
                procs[dev], where[dev] = self._spawn(f"{key}-{dev}", dev, argv, cwd), dev
            self._wait_listening(listen, procs)
            dev, argv, cwd = main
            name = dev if dev not in procs else f"{dev}-client"
            procs[name], where[name] = self._spawn(f"{key}-{name}", dev, argv, cwd), dev
            with ExitStack() as stack:
                whole = stack.enter_context(PeakSampler({n: p.pid for n, p in procs.items()}))
                killed, peak = self._wait(key, procs, name, oom, stack)
            peak = dict(whole.peak) if killed else peak  # an OOM run: what it held until the kill
        finally:
            stop_processes(list(procs.values()), 10.0)
        pressure: dict[str, float] = {}
        for n, rss in peak.items():
            pressure[where[n]] = pressure.get(where[n], 0.0) + rss / self.tb.memory_limit(where[n])
        out = {"memory_pressure": pressure, "rss_anon_bytes": peak}
        if killed:
            return {"oom": True, "oom_devices": killed, **out}
        log = self.tb.log_path(f"{key}-{name}").read_text(errors="replace")
        prompt_ms, n_prompt = prompt_eval(log)
        return {"ms_per_token": eval_ms_per_token(log), "ttft_ms": prompt_ms, "n_prompt": n_prompt, **out}

    def _wait(
        self, key: str, procs: dict[str, subprocess.Popen], main: str, oom: OomWatch, stack: ExitStack
    ) -> tuple[list[str], dict[str, int]]:
        """Wait for process ``main`` to end: the devices OOM-killed meanwhile (empty: it ended well) and each
        process's peak ``RssAnon`` from the moment ``main`` starts generating (its log's ``sampler chain`` line:
        loading and prima.cpp's profiling are not counted, as homering's agents are sampled during the measured
        request only; weights the rpc servers hold are, they stay).

        Raises:
            HomeringError: a process failed other than by OOM, or ``main`` ran past the bench's timeout.
        """
        deadline, log = time.monotonic() + self.bench.timeout, self.tb.log_path(f"{key}-{main}")
        peaks: PeakSampler | None = None
        while True:
            if peaks is None and GENERATING in log.read_text(errors="replace"):
                peaks = stack.enter_context(PeakSampler({n: p.pid for n, p in procs.items()}))
            rc = procs[main].poll()
            failed = {n: p for n, p in procs.items() if p.poll() not in (None, 0)}
            killed = oom.killed(failed)
            if killed or rc == 0:
                stack.close()
                return killed, dict(peaks.peak) if peaks else dict.fromkeys(procs, 0)
            if failed:
                name = main if main in failed else next(iter(failed))
                where = self.tb.log_path(f"{key}-{name}")
                tail = " | ".join(where.read_text(errors="replace").strip().splitlines()[-3:])
                raise HomeringError(f"{key}: {name} exited with {failed[name].returncode}: {tail} (see {where})")
            if time.monotonic() > deadline:
                raise HomeringError(f"{key}: {main} ran longer than {self.bench.timeout:.0f} s")
            time.sleep(POLL_S)

    def _wait_listening(self, devices: list[str], procs: dict[str, subprocess.Popen], timeout: float = 120.0) -> None:
        from homering.testbed.broker import port_open

        deadline = time.monotonic() + timeout
        for d in devices:
            while not port_open(self.tb.address(d), RPC_PORT, timeout=1.0):
                if procs[d].poll() is not None or time.monotonic() > deadline:
                    raise HomeringError(f"the rpc server on {d} is not listening on port {RPC_PORT}")
                time.sleep(0.2)

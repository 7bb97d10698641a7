"""The systems a user would pick instead, run in the same benchmark: prima.cpp's ring and llama.cpp RPC.

Both are built from sources by ``make peers`` (the build script and its notes are the project's
shared peers folder; the binaries land in ``.peers/``, their paths in ``.peers/env.sh``):

- **prima.cpp** (the PRIMA.CPP paper's own system, arXiv 2504.08791): one ``llama-cli`` process per
  rank, a ring over ZMQ; the workers start first, rank 0 carries the prompt; ``-lw`` gives each
  rank's layers (one round here, the same split as homering's proportional plan on equal devices).
- **llama.cpp RPC**: one ``ggml-rpc-server`` per device and ``llama-completion`` with ``--rpc`` and
  ``-ngl 99`` (without it nothing is offloaded to the servers).

On an emulated cluster, one process per device, :mod:`homering.bench.cluster_peers` runs them.

Both report decode speed in llama.cpp's perf line (``eval time = … ms / N runs (X ms per token``),
which :func:`eval_ms_per_token` reads: decode only, prompt processing excluded, as homering's
head reports it.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from homering.errors import HomeringError

PEERS = ("prima", "rpc")
BINARIES = {"prima": ("PRIMA_CLI",), "rpc": ("LLAMACPP_RPC_SERVER", "LLAMACPP_COMPLETION")}
ENV_FILE = Path(".peers") / "env.sh"
RUN_TIMEOUT_S = 600.0

_EVAL = re.compile(r"(?<!prompt )eval time\s*=\s*[\d.]+ ms\s*/\s*\d+ (?:runs|tokens)\s*\(\s*([\d.]+) ms per token")


def parse_peers(text: str | None) -> list[str]:
    """``"prima,rpc"`` → ``["prima", "rpc"]``.

    Raises:
        HomeringError: an unknown peer.
    """
    names = [p.strip() for p in (text or "").split(",") if p.strip()]
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise HomeringError(f"unknown peer(s) {', '.join(unknown)}: choose from {', '.join(PEERS)}")
    return names


def peer_binaries(peers: Sequence[str], env_file: Path = ENV_FILE) -> dict[str, str]:
    """The paths of the binaries ``peers`` need: from the environment, else from ``env_file`` (``make peers``).

    Raises:
        HomeringError: a binary that is not built.
    """
    known = dict(os.environ)
    if env_file.is_file():
        for line in env_file.read_text().splitlines():
            m = re.match(r"\s*export\s+([A-Z_]+)=(\S+)", line)
            if m and m.group(1) not in known:
                known[m.group(1)] = m.group(2)
    out = {}
    for peer in peers:
        for var in BINARIES[peer]:
            path = known.get(var)
            if not path or not os.access(path, os.X_OK):
                raise HomeringError(
                    f"{peer} is not built ({var} is not set to an executable): run `make peers`, which builds the "
                    f"peer systems into .peers/, or set {var}"
                )
            out[var] = path
    return out


def eval_ms_per_token(log: str) -> float:
    """Decode ms per token from llama.cpp's perf output (the ``eval time`` line, not ``prompt eval time``).

    Raises:
        HomeringError: no such line (the run failed: the log's tail is in the message).
    """
    found = _EVAL.findall(log)
    if not found:
        tail = " | ".join(log.strip().splitlines()[-3:])
        raise HomeringError(f"no 'eval time' line in the peer's output: {tail}")
    return float(found[-1])


def even_split(n_layers: int, n: int) -> list[int]:
    """Layers per rank for one round over ``n`` ranks, as even as possible (the first ranks take the rest)."""
    base, extra = divmod(n_layers, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


def free_ports(count: int) -> int:
    """A base port such that ``base … base + count - 1`` are free on 127.0.0.1 now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count < 65535 and all(_free(base + i) for i in range(count)):
            return base
    raise HomeringError("no free range of ports on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HomeringError(f"a peer server exited ({proc.returncode}) before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise HomeringError(f"a peer server did not listen on {port} within {timeout:.0f} s")


def _background(stack: ExitStack, argv: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(_stop, proc)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _foreground(argv: list[str]) -> str:
    """Run ``argv`` to its end; its stdout and stderr together (llama.cpp prints its perf lines on stderr)."""
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise HomeringError(f"{shlex.join(argv[:1])} ran longer than {RUN_TIMEOUT_S:.0f} s") from None
    log = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    if done.returncode != 0:
        tail = " | ".join(log.strip().splitlines()[-3:])
        raise HomeringError(f"{Path(argv[0]).name} failed (exit {done.returncode}): {tail}")
    return log


def _sampling(prompt: str, n_tokens: int, threads: int) -> list[str]:
    return ["-p", prompt, "-n", str(n_tokens), "--temp", "0", "--top-k", "1", "-s", "42", "--ignore-eos",
            "-t", str(threads)]  # fmt: skip


def run_prima(bins: dict[str, str], model: Path, n: int, n_layers: int, *, prompt: str, n_tokens: int,
              threads: int = 1) -> float:  # fmt: skip
    """prima.cpp's ring of ``n`` ranks on loopback (one round, :func:`even_split`); decode ms/token of rank 0."""
    cli, data, signal = bins["PRIMA_CLI"], free_ports(n), free_ports(n)
    ports = ["--master", "127.0.0.1", "--data-port", str(data), "--signal-port", str(signal)]
    with ExitStack() as stack:
        for rank in range(n - 1, 0, -1):  # the workers first; they exit when rank 0 is done
            _background(stack, [cli, "-m", str(model), "--world", str(n), "--rank", str(rank), *ports,
                                "--next", "127.0.0.1", "-t", str(threads)])  # fmt: skip
        lw = ",".join(map(str, even_split(n_layers, n)))
        argv = [cli, "-m", str(model), "--world", str(n), "--rank", "0", *ports, "--next", "127.0.0.1",
                "-lw", lw, "-c", "1024", *_sampling(prompt, n_tokens, threads)]  # fmt: skip
        return eval_ms_per_token(_foreground(argv))


def run_rpc(bins: dict[str, str], model: Path, n: int, *, prompt: str, n_tokens: int, threads: int = 1) -> float:
    """llama.cpp RPC: ``n`` ``ggml-rpc-server`` s on loopback and ``llama-completion`` offloading every layer
    to them; decode ms/token."""
    base = free_ports(n)
    with ExitStack() as stack:
        for i in range(n):
            server = [bins["LLAMACPP_RPC_SERVER"], "-H", "127.0.0.1", "-p", str(base + i), "-t", str(threads)]
            _wait_listening(base + i, _background(stack, server))
        rpc = ",".join(f"127.0.0.1:{base + i}" for i in range(n))
        argv = [bins["LLAMACPP_COMPLETION"], "-m", str(model), "--rpc", rpc, "-ngl", "99", "-no-cnv", "-c", "1024",
                *_sampling(prompt, n_tokens, threads)]  # fmt: skip
        return eval_ms_per_token(_foreground(argv))


_PROMPT_EVAL = re.compile(r"prompt eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) tokens")
_SEEN_RAM = re.compile(r"^\|\s*Physical Mem Total \(GiB\)\s*((?:\|\s*[\d.]+\s*)+)", re.M)
_OWN_K = re.compile(r"^\s*- k = (\d+)\s*$", re.M)
_OWN_W = re.compile(r"^\s*- N Layer Window\s*:\s*(\d+)\s*$", re.M)
_DROPPED = re.compile(r"Remove device .* \(rank (\d+)\) with only")

PRIMA_PROFILED_TYPES = frozenset(
    {"F32", "F16", "Q2_K", "Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q8_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ4_NL"}
)
"""The weight types prima.cpp's profiler knows (``llama_profile_device`` in its ``src/llama.cpp``); it throws
"Unrecognized weight type" on any other, e.g. Q4_0 and Q4_1. Runs with ``-lw`` do not profile."""


def prompt_eval(log: str) -> tuple[float, int]:
    """``(ms, tokens)`` of llama.cpp's ``prompt eval time`` line: the forward pass over the whole prompt, which
    ends with the first generated token's logits.

    Raises:
        HomeringError: no such line.
    """
    found = _PROMPT_EVAL.findall(log)
    if not found:
        raise HomeringError("no 'prompt eval time' line in the peer's output")
    ms, n = found[-1]
    return float(ms), int(n)


def prima_seen_ram_gib(log: str) -> list[float]:
    """The RAM each rank's profiler saw, GiB, in rank order (rank 0's device table, ``Physical Mem Total``);
    empty when prima.cpp did not profile (``-lw`` given)."""
    m = _SEEN_RAM.search(log)
    return [float(v) for v in re.findall(r"[\d.]+", m.group(1))] if m else []


def prima_own_plan(log: str, world: int) -> dict | None:
    """prima.cpp's Halda plan from rank 0's log (its last ``Allocation Strategy (by HiGHS)`` block, after the
    ``Remove device … (rank r)`` lines of the ranks it dropped as too weak): ``{"k": rounds, "lw": layers per
    round of each of the ``world`` ranks (0 for a dropped one)}``; None when it did not plan (``-lw`` given)."""
    k = _OWN_K.findall(log)
    if not k:
        return None
    dropped = {int(r) for r in _DROPPED.findall(log)}
    kept = iter(int(w) for w in _OWN_W.findall(log.rsplit("Allocation Strategy", 1)[-1]))
    return {"k": int(k[-1]), "lw": [0 if r in dropped else next(kept, 0) for r in range(world)]}


def prima_refused_types(model: Path) -> list[str]:
    """The weight types of ``model`` that prima.cpp's profiler refuses (:data:`PRIMA_PROFILED_TYPES`), sorted."""
    from gguf import GGMLQuantizationType

    from homering.models.gguf_file import read_gguf

    names = {GGMLQuantizationType(t.ggml_type).name for t in read_gguf(model).tensors}
    return sorted(names - PRIMA_PROFILED_TYPES)

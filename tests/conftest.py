"""Shared fixtures: real models, a real mosquitto broker on loopback, the reference model."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from homering.models.registry import resolve_model
from homering.transport.broker import free_port, wait_for_port
from homering.transport.mqtt import BrokerURL
from tests.reference import Reference


def wait_healthy(
    base: str, procs: list[subprocess.Popen], *, timeout: float = 240.0, log_path: Path | None = None
) -> float:
    """Wait until ``base``/health answers 200; fail the test (with the log's tail) if one of ``procs`` exits
    first or ``timeout`` seconds pass. Returns the seconds waited."""
    t0 = time.monotonic()
    tail = lambda: f":\n{log_path.read_text()[-3000:]}" if log_path is not None and log_path.exists() else ""  # noqa: E731
    while time.monotonic() - t0 < timeout:
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{' '.join(map(str, p.args[3:5]))} exited with code {p.returncode}{tail()}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"the API at {base} did not become healthy within {timeout:.0f} s{tail()}")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return resolve_model("smollm2", quiet=True)


@pytest.fixture(scope="session")
def gemma() -> Path:
    return resolve_model("gemma3-270m", quiet=True)


@pytest.fixture(scope="session")
def smollm2_ref(smollm2) -> Reference:
    ref = Reference(smollm2)
    yield ref
    ref.close()


@pytest.fixture(scope="session")
def gemma_ref(gemma) -> Reference:
    ref = Reference(gemma)
    yield ref
    ref.close()


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if not found:
        pytest.fail("mosquitto is not installed: run 'make test' (it installs it)")
    return found


@contextlib.contextmanager
def run_mosquitto(folder: Path, config=None):
    """A real mosquitto on a free loopback port; its config (``config(port)``, default: anonymous access
    allowed) and its log in ``folder``."""
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(config(port) if config else f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    with open(folder / "mosquitto.log", "w") as log:
        proc = subprocess.Popen([_mosquitto_binary(), "-c", str(conf)], stdout=log, stderr=log)
        try:
            if not wait_for_port("127.0.0.1", port):
                pytest.fail(f"mosquitto did not start: {(folder / 'mosquitto.log').read_text()}")
            yield BrokerURL("127.0.0.1", port)
        finally:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory) -> BrokerURL:
    """A real mosquitto broker on a free loopback port, shared by the session."""
    with run_mosquitto(tmp_path_factory.mktemp("mosquitto")) as url:
        yield url


@pytest.fixture(scope="module")
def keyed_cluster(smollm2, mosquitto, tmp_path_factory):
    """3 agents + a controller sharing a random cluster key, on mosquitto (context 256, proportional planner).

    Module-scoped (one cluster on the broker at a time: controllers share a client id). The key is
    ``cluster.key``; the children's logs are in ``cluster.log_path``.
    """
    from homering.client.local import LocalCluster
    from homering.wire.security import ClusterKey, generate_secret

    key = ClusterKey(generate_secret(), source="the test")
    log_path = tmp_path_factory.mktemp("logs") / "keyed-cluster.log"
    with (
        open(log_path, "w") as log_file,
        LocalCluster(
            smollm2,
            n_agents=3,
            broker=mosquitto,
            threads=1,
            n_ctx=256,
            planner="proportional",
            log_file=log_file,
            key=key,
        ) as c,
    ):
        c.log_path = log_path
        yield c


QWEN2_SMALL_LAYERS = 6  # k = 2 rounds over 3 agents need 6 windows of at least one layer


@pytest.fixture(scope="session")
def qwen2_small(tmp_path_factory) -> Path:
    """A small synthetic qwen2 model (Qwen2.5-0.5B's layers and attention biases, Q4_K_M with its Q5_0/Q8_0
    fallbacks, 6 layers, SmolLM2's 49152-token vocabulary), written once per session (seed 0, about 0.5 s)."""
    from homering.models.synth import synthesize

    out = tmp_path_factory.mktemp("qwen2") / "qwen2.5-0.5b-q4_k_m-6l.gguf"
    return synthesize("qwen2.5-0.5b", "q4_k_m", out, n_layers=QWEN2_SMALL_LAYERS, n_vocab=49152, progress=False)


@pytest.fixture(scope="session")
def qwen2_small_ref(qwen2_small) -> Reference:
    ref = Reference(qwen2_small)
    yield ref
    ref.close()


# ---------------------------------------------------------------- the architectures of issue 23 (small shapes)
ARCH_SMALL_LAYERS = 6  # k = 2 rounds over 3 agents: 6 windows of one layer
ARCH_SLIDING_WINDOW = 8  # gemma2's window, shorter than a test's sequence (4096 would hide wrong SWA flags)


def _small_model(tmp_path_factory, shape: str, **kw) -> Path:
    """A synthetic ``shape`` at q4_k_m with 6 layers and SmolLM2's 49152-token vocabulary (seed 0)."""
    from homering.models.synth import synthesize

    out = tmp_path_factory.mktemp(shape) / f"{shape}-q4_k_m-6l.gguf"
    return synthesize(shape, "q4_k_m", out, n_layers=ARCH_SMALL_LAYERS, n_vocab=49152, progress=False, **kw)


@pytest.fixture(scope="session")
def qwen3_small(tmp_path_factory) -> Path:
    """Qwen3-0.6B's layers (per-head Q/K norms, head size 128), 6 of 28, 98 MB."""
    return _small_model(tmp_path_factory, "qwen3-0.6b")


@pytest.fixture(scope="session")
def qwen3moe_small(tmp_path_factory) -> Path:
    """qwen3moe-tiny: 6 MoE layers of 8 experts, top-2, 157 MB."""
    return _small_model(tmp_path_factory, "qwen3moe-tiny")


@pytest.fixture(scope="session")
def phi3_small(tmp_path_factory) -> Path:
    """Phi-3-mini's layers (fused QKV and gate/up), 6 of 32, 606 MB."""
    return _small_model(tmp_path_factory, "phi3-mini")


@pytest.fixture(scope="session")
def gemma2_small(tmp_path_factory) -> Path:
    """Gemma-2-2B's layers (post norms, soft-capping, sliding window on even layers, here 8 tokens), 6 of 26."""
    return _small_model(tmp_path_factory, "gemma2-2b", sliding_window=ARCH_SLIDING_WINDOW)


def _ref(path: Path):
    ref = Reference(path, n_ctx=512)
    yield ref
    ref.close()


@pytest.fixture(scope="session")
def qwen3_small_ref(qwen3_small) -> Reference:
    yield from _ref(qwen3_small)


@pytest.fixture(scope="session")
def qwen3moe_small_ref(qwen3moe_small) -> Reference:
    yield from _ref(qwen3moe_small)


@pytest.fixture(scope="session")
def phi3_small_ref(phi3_small) -> Reference:
    yield from _ref(phi3_small)


@pytest.fixture(scope="session")
def gemma2_small_ref(gemma2_small) -> Reference:
    yield from _ref(gemma2_small)


@pytest.fixture(scope="session")
def smollm2_f16(smollm2) -> Path:
    """SmolLM2 dequantized to F16 (written once, cached): the target of a real draft/target pair whose draft
    is the Q4_1 original."""
    from homering.models.dequantize import dequantize_to_f16

    return dequantize_to_f16(smollm2)


@pytest.fixture(scope="session")
def smollm2_f16_ref(smollm2_f16) -> Reference:
    ref = Reference(smollm2_f16)
    yield ref
    ref.close()

"""Window distribution end to end: agents without the model download their windows (and profiling probes) from
the controller's API, check them against the plan's SHA-256 and answer like the unsplit model.

Real processes (`homering controller`, `homering agent --no-local-model`) on a real mosquitto, real llama.cpp;
the agents get a HOMERING_HOME of their own (empty: no window, no profile), the controller keeps the default one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from homering.client.chat import ask
from homering.client.client import ClusterClient, new_request_id
from homering.client.local import stop_processes
from homering.transport.broker import free_port
from homering.transport.windows import WindowClient, cache_path
from homering.wire import ChatMessage, GenerateRequest, Sampling
from tests.conftest import run_mosquitto, wait_healthy

API_KEY = "sk-homering-dist-0123456789"
N_CTX = 256
MAX_NEW = 24


def _homering(*args: str, log, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "homering", *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env
    )


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("HOMERING_API_KEY", "HOMERING_MQTT"))}


@pytest.fixture(scope="module")
def remote(smollm2, mosquitto, tmp_path_factory):
    """A controller with --api-port and an API key file, and 2 agents with --no-local-model sharing an empty
    HOMERING_HOME of their own (the key in $HOMERING_API_KEY)."""
    folder = tmp_path_factory.mktemp("dist")
    key_file = folder / "api-key"
    key_file.write_text(API_KEY + "\n")
    agent_home = folder / "agent-home"
    agent_home.mkdir()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = folder / "cluster.log"
    log = open(log_path, "w")
    procs = [
        _homering(
            "controller",
            "--broker",
            str(mosquitto),
            "--model",
            str(smollm2),
            "--agents",
            "2",
            "--ctx",
            str(N_CTX),
            "--planner",
            "proportional",
            "--api-port",
            str(port),
            "--api-key-file",
            str(key_file),
            log=log,
            env=_clean_env(),
        )
    ]
    agent_env = {**_clean_env(), "HOMERING_HOME": str(agent_home), "HOMERING_API_KEY": API_KEY}
    t0 = time.monotonic()
    for i in range(2):
        procs.append(
            _homering(
                "agent",
                "--broker",
                str(mosquitto),
                "--name",
                f"remote-{i}",
                "--threads",
                "1",
                "--no-local-model",
                log=log,
                env=agent_env,
            )
        )
    try:
        wait_healthy(base, procs, timeout=300, log_path=log_path)
        yield {"base": base, "broker": mosquitto, "home": agent_home, "log": log_path, "ready_s": time.monotonic() - t0}
    finally:
        stop_processes(procs, 15)
        log.close()


def _cluster(base: str) -> dict:
    resp = httpx.get(f"{base}/v1/cluster", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5)
    assert resp.status_code == 200
    return resp.json()


def _plan_windows(base: str) -> list[dict]:
    return [w for a in _cluster(base)["agents"] if a["in_plan"] for w in a["windows"]]


def test_agents_without_the_model_download_their_windows_and_match_the_unsplit_model(remote, smollm2_ref, smollm2):
    windows = _plan_windows(remote["base"])
    spans = sorted((w["start"], w["end"]) for w in windows)
    assert len(spans) == 2 and spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == 30
    home = remote["home"]
    for w in windows:  # downloaded by hash, intact
        path = home / "windows" / "sha256" / f"{w['sha256']}.gguf"
        assert path.stat().st_size == w["size"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == w["sha256"]
    # nothing was sliced in the agents' home: they never read the model
    assert [p.name for p in (home / "windows").iterdir() if p.is_dir()] == ["sha256"]
    assert not (home / "models").exists()
    # they profiled from downloaded probe windows
    assert list((home / "profiles").glob("*.json"))
    log = remote["log"].read_text()
    assert "downloaded window probe" in log and "downloaded window 0-" in log

    async def go():
        async with ClusterClient(remote["broker"]) as client:
            await client.wait_ready()
            return await ask(
                client,
                GenerateRequest(
                    request_id=new_request_id(),
                    sampling=Sampling(max_tokens=MAX_NEW, temperature=0),
                    messages=[ChatMessage(role="user", content="What is the capital of France?")],
                ),
            )

    answer = asyncio.run(asyncio.wait_for(go(), 180))
    smollm2_ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, MAX_NEW)
    sizes = sum(w["size"] for w in windows)
    print(f"\ncluster ready {remote['ready_s']:.1f} s after start; windows {sizes / 1e6:.1f} MB")


def test_a_corrupted_cached_window_is_fetched_again(remote, tmp_path, monkeypatch, caplog):
    """A window in the cache whose bytes no longer match the plan's hash is deleted and downloaded again."""
    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    w = _plan_windows(remote["base"])[0]
    with WindowClient(f"{remote['base']}/v1", API_KEY, progress=False) as client:
        t0 = time.perf_counter()
        first = client.fetch(w["sha256"], w["size"], "first")
        dt = time.perf_counter() - t0
        assert first == cache_path(w["sha256"]) and first.stat().st_size == w["size"]
        with caplog.at_level(logging.INFO, logger="homering.windows"):
            assert client.fetch(w["sha256"], w["size"], "hit") == first  # intact: a cache hit, no download
        assert not [r for r in caplog.records if "window hit" in r.getMessage()]
        with open(first, "r+b") as fh:  # flip one byte in the middle
            fh.seek(w["size"] // 2)
            b = fh.read(1)
            fh.seek(w["size"] // 2)
            fh.write(bytes([b[0] ^ 0xFF]))
        assert hashlib.sha256(first.read_bytes()).hexdigest() != w["sha256"]
        with caplog.at_level(logging.INFO, logger="homering.windows"):
            again = client.fetch(w["sha256"], w["size"], "again")
    assert hashlib.sha256(again.read_bytes()).hexdigest() == w["sha256"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("does not match the plan's sha256" in m for m in messages), messages
    assert any(m.startswith("downloaded window again") for m in messages), messages
    print(f"\nwindow of {w['size'] / 1e6:.1f} MB downloaded over loopback in {dt:.2f} s")


def test_window_endpoint_needs_the_key_and_serves_only_plan_windows(remote, smollm2):
    base = remote["base"]
    w = _plan_windows(base)[0]
    url = f"{base}/v1/windows/{w['sha256']}"
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer sk-wrong"}, timeout=10).status_code == 401
    assert httpx.get(f"{base}/v1/windows/probe/14-16-middle", timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {API_KEY}"}
    ok = httpx.get(url, headers=auth, timeout=30)
    assert ok.status_code == 200 and hashlib.sha256(ok.content).hexdigest() == w["sha256"]
    unknown = httpx.get(f"{base}/v1/windows/{'0' * 64}", headers=auth, timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "window_not_found"
    model_sha = hashlib.sha256(Path(smollm2).read_bytes()).hexdigest()  # a file the controller has, not a window
    assert httpx.get(f"{base}/v1/windows/{model_sha}", headers=auth, timeout=10).status_code == 404
    for bad in ("..%2F..%2Fetc%2Fpasswd", "probe", w["sha256"].upper()):
        assert httpx.get(f"{base}/v1/windows/{bad}", headers=auth, timeout=10).status_code == 404
    # probe windows: only those the profiler may ask for
    assert httpx.get(f"{base}/v1/windows/probe/0-30-whole", headers=auth, timeout=10).status_code == 404
    assert httpx.get(f"{base}/v1/windows/probe/0-15-first", headers=auth, timeout=10).status_code == 404
    probe = httpx.get(f"{base}/v1/windows/probe/26-30-last", headers=auth, timeout=60)
    assert probe.status_code == 200 and probe.json()["role"] == "last"


@pytest.fixture
def own_broker(tmp_path):
    """A mosquitto of this test's own (the module's cluster keeps the shared one busy)."""
    with run_mosquitto(tmp_path) as url:
        yield str(url)


def test_without_an_api_port_an_agent_without_the_model_says_why(smollm2, own_broker, tmp_path):
    """No --api-port: no window is served, so an agent without the model cannot join; the controller's error
    names the reason."""
    mosquitto = own_broker
    env = {**_clean_env(), "HOMERING_HOME": str(tmp_path / "home")}
    with open(tmp_path / "log", "w") as log:
        procs = [
            _homering(
                "controller",
                "--broker",
                str(mosquitto),
                "--model",
                str(smollm2),
                "--agents",
                "1",
                "--timeout",
                "6",
                log=log,
                env=_clean_env(),
            ),
            _homering(
                "agent",
                "--broker",
                str(mosquitto),
                "--name",
                "lonely",
                "--threads",
                "1",
                "--no-local-model",
                log=log,
                env=env,
            ),
        ]
        try:
            assert procs[0].wait(60) == 2
        finally:
            stop_processes(procs, 10)
    out = (tmp_path / "log").read_text()
    assert "lonely: cannot profile" in out and "the controller serves no windows (start it with --api-port" in out


def test_the_window_cache_keeps_the_plan_recent_files_and_a_budget_of_others(tmp_path, monkeypatch):
    """prune_cache: never the plan's files nor files younger than the age guard; the oldest others go
    first, with their hash memos, until the spare budget holds; the disk probe file is not a window."""
    from homering.transport.windows import prune_cache

    monkeypatch.setenv("HOMERING_HOME", str(tmp_path))
    root = tmp_path / "windows"
    now = time.time()

    def window(rel: str, size_mb: int, age_s: float) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"\0" * (size_mb << 20))
        p.with_name(p.name + ".sha256").write_text("memo")
        os.utime(p, (now - age_s, now - age_s))
        return p

    plan = window("fp/0-10-first.f2.gguf", 3, 10_000)  # in the plan: kept although oldest
    old = window("fp/10-20-middle.f2.gguf", 2, 9_000)  # oldest other: goes first
    older_hash = window("sha256/" + "a" * 64 + ".gguf", 2, 8_000)
    newer = window("fp/20-30-last.f2.gguf", 2, 7_000)
    fresh = window("other/0-5-first.f2.gguf", 2, 60)  # written a minute ago: kept
    probe = root / "homering-disk-probe.bin"
    probe.write_bytes(b"\0" * (1 << 20))
    os.utime(probe, (now - 99_999, now - 99_999))

    freed = prune_cache({plan}, spare_bytes=4 << 20)  # others: 8 MiB, of which 2 are too young
    assert freed == 4 << 20
    assert not old.exists() and not older_hash.exists() and not old.with_name(old.name + ".sha256").exists()
    assert plan.exists() and newer.exists() and fresh.exists() and probe.exists()
    assert prune_cache({plan}, spare_bytes=0, min_age_s=30) == 4 << 20 and not fresh.exists() and plan.exists()

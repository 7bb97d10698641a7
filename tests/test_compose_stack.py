"""The home-server stack for real: docker/compose.yaml built and run on a Docker engine of the test's own.

The README's "Home server" commands are read from the README and run, in order, on a copy of the repository
(so the README stays the exact sequence): ``make secrets``, ``cp docker/.env.example docker/.env``, ``docker
compose … build``, ``up -d``, the ``curl`` of ``/v1/models``, ``--scale agent=3`` and ``down -v``. The only
differences are the settings a host without a container registry needs, given as environment variables
(which Compose prefers to ``docker/.env``): the base images (a Debian debootstrap, :mod:`tests.compose_engine`),
this host's CA bundle as the build secret ``ca_certs`` (its HTTPS goes through a proxy with its own CA), and
free host ports.

Checked against the stack: the API key (401 without it), ``/v1/models`` (the registry name is an alias), a
greedy chat answer identical to the unsplit model's (llama-cpp-python here, same chat template), a streamed
answer, three agents (the controller, not restarted, re-plans; the answer stays identical), an agent
container killed with ``docker kill`` mid-answer (the answer completes, identical), the agents' healthchecks
(no handshake warning in their logs), anonymous MQTT refused; then ``down -v`` leaves no container, network
or volume, and the engine, its mounts and its NAT table are gone.

Root on Linux x86_64 with apt (``make compose-test``; ``make test`` runs it there); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from homering.engine.tokenizer import Tokenizer
from homering.transport.broker import free_port
from tests import compose_engine
from tests.compose_engine import Engine

REPO = Path(__file__).resolve().parent.parent
SKIP = compose_engine.skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600), pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

PROMPT = "Tell me about the history of bread."
MAX_NEW = 48
KILL_MAX_NEW = 64
UP_TIMEOUT_S = 2700  # a cold image build (llama.cpp compiles) on 2 busy cores, then the model pull


def home_server_commands() -> list[str]:
    """The commands of the README's "Home server" section (its first ``sh`` block), comments removed."""
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Home server\n")
    section = text[start : text.find("\n## ", start + 1)]
    block = section[section.index("```sh\n") + 6 :]
    block = block[: block.index("```")]
    commands = []
    for line in block.splitlines():
        command = line.split("  #")[0].strip()
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def _command(commands: list[str], needle: str) -> str:
    found = [c for c in commands if needle in c]
    assert len(found) == 1, f"the README's Home server block has {len(found)} lines with {needle!r}: {commands}"
    return found[0]


class Stack:
    """The running stack: the repository copy it runs in, the clients' environment, the API's address."""

    def __init__(self, engine: Engine, folder: Path, env: dict[str, str], api_port: int, mqtt_port: int) -> None:
        self.engine, self.folder, self.env = engine, folder, env
        self.api_port, self.mqtt_port = api_port, mqtt_port
        self.base = f"http://127.0.0.1:{api_port}"
        self.commands = home_server_commands()
        self.timings: dict[str, float] = {}
        self.down = False

    @property
    def key(self) -> str:
        return (self.folder / "docker" / "secrets" / "api_key").read_text().strip()

    def sh(self, command: str, *, capture: bool = False, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """Run a README line with bash in the copy, against the test's engine; fail with its output."""
        out = subprocess.PIPE if capture else None
        t0 = time.monotonic()
        proc = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command],
            cwd=self.folder,
            env=self.env,
            text=True,
            stdout=out,
            stderr=out,
            timeout=timeout,
            check=False,
        )
        self.timings[command] = time.monotonic() - t0
        assert proc.returncode == 0, f"`{command}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        return proc

    def compose(self, *args: str, timeout: float = 300) -> str:
        return self.sh(" ".join(["docker compose -f docker/compose.yaml", *args]), capture=True, timeout=timeout).stdout

    def containers(self, service: str) -> list[str]:
        """Full ids of the service's running containers."""
        return self.compose("ps", "-q", "--no-trunc", service).split()

    def health(self) -> dict[str, str]:
        """Container id → health status of every container of the stack."""
        ids = self.compose("ps", "-q", "--no-trunc").split()
        if not ids:
            return {}
        out = self.engine.docker("inspect", "--format", "{{.Id}} {{.State.Health.Status}}", *ids, capture=True)
        return dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)

    def wait_healthy(self, n_agents: int, timeout: float) -> None:
        """Wait until every container is healthy, ``n_agents`` of them agents, and the API answers /health."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.health()
            if len(self.containers("agent")) == n_agents and health and set(health.values()) == {"healthy"}:
                try:
                    if httpx.get(f"{self.base}/health", timeout=5).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(2)
        logs = self.compose("logs", "--tail", "40")
        pytest.fail(f"the stack was not healthy within {timeout:.0f} s: {self.health()}\n{logs[-6000:]}")

    def cluster(self) -> dict:
        resp = httpx.get(f"{self.base}/v1/cluster", headers={"Authorization": f"Bearer {self.key}"}, timeout=10)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def wait_plan(self, agents: int, *, other_than: str | None = None, timeout: float = 300) -> dict:
        """The cluster once its plan covers ``agents`` online agents (ring and dropped ones; a plan other than
        ``other_than``) and it is ready."""
        deadline = time.monotonic() + timeout
        c: dict = {}
        while time.monotonic() < deadline:
            c = self.cluster()
            online = {a["name"] for a in c["agents"] if a["status"] != "offline"}
            plan = c["plan"]
            if c["state"] == "ready" and plan and len(online) == agents and plan["plan_id"] != other_than:
                if set(plan["ring"]) | set(plan["dropped"]) == online:
                    return c
            time.sleep(1)
        pytest.fail(f"no ready plan over {agents} agents within {timeout:.0f} s: {json.dumps(c)[:3000]}")


def _copy_repo(dest: Path) -> None:
    """The repository's files (tracked, and new ones not ignored) into ``dest``: what a clone has."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def engine():
    """A dockerd of the test's own with NAT for its subnet; afterwards no dockerd, mount or NAT table is left."""
    compose_engine.ensure_packages()
    root = Path(tempfile.mkdtemp(prefix="homering-compose-"))
    kept = os.environ.get("HOMERING_COMPOSE_DATA_ROOT")  # developing the test: keep images and build cache
    eng = Engine(root, Path(kept) if kept else None)
    try:
        with compose_engine.nat():
            try:
                eng.start()
                yield eng
            finally:
                eng.stop()
    finally:
        left = compose_engine.mounts_under(root)
        shutil.rmtree(root, ignore_errors=True)
    assert eng.proc is not None and eng.proc.poll() is not None, "dockerd still runs"
    assert not left, f"mounts left under the engine's folder: {left}"


@pytest.fixture(scope="module")
def stack(engine: Engine, tmp_path_factory):
    """The README's commands up to ``up -d``, then a healthy stack of 2 agents; ``down -v`` at the end
    (the last test runs the README's; this finalizer only if that test did not)."""
    base = compose_engine.debian_base(engine)
    compose_engine.mosquitto_image(engine, base, tmp_path_factory.mktemp("images"))
    folder = tmp_path_factory.mktemp("homering")
    _copy_repo(folder)
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    api_port, mqtt_port = free_port(), free_port()
    env = {
        **engine.env,
        "HOMERING_API_PORT": str(api_port),
        "MQTT_PORT": str(mqtt_port),
        "HOMERING_BUILD_IMAGE": base,
        "HOMERING_RUNTIME_IMAGE": base,
        "HOMERING_CA_CERTS": str(bundle) if bundle.exists() else "/dev/null",
    }
    s = Stack(engine, folder, env, api_port, mqtt_port)
    up = next(c for c in s.commands if c.endswith(" up -d"))
    try:
        for command in s.commands[: s.commands.index(up) + 1]:
            s.sh(command, timeout=UP_TIMEOUT_S)
        s.wait_healthy(2, UP_TIMEOUT_S)
        print(f"\ncompose stack: {json.dumps({c: round(t, 1) for c, t in s.timings.items()}, indent=1)}")
        yield s
    finally:
        if not s.down:
            subprocess.run(
                ["docker", "compose", "-f", "docker/compose.yaml", "down", "-v", "--timeout", "5"],
                cwd=folder,
                env=env,
                check=False,
            )


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base}/v1", api_key=stack.key, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def expected(smollm2, smollm2_ref) -> dict[int, str]:
    """The unsplit model's greedy answers (chat template, not stopping at end-of-generation): n tokens → text."""
    tokenizer = Tokenizer(smollm2)
    try:
        prompt_ids = tokenizer.chat_tokens([{"role": "user", "content": PROMPT}])
        ref, _ = smollm2_ref.greedy(prompt_ids, KILL_MAX_NEW)
        return {n: tokenizer.detokenize(ref[:n]) for n in (MAX_NEW, KILL_MAX_NEW)}
    finally:
        tokenizer.close()


def _chat(client: openai.OpenAI, max_tokens: int = MAX_NEW):
    return client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
    )


def _stream(client: openai.OpenAI, max_tokens: int = MAX_NEW, on_chunk=None) -> str:
    """A streamed greedy chat answer; ``on_chunk(i)`` after the i-th text chunk."""
    text, i = [], 0
    stream = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_tokens=max_tokens,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                text.append(choice.delta.content)
                i += 1
                if on_chunk is not None:
                    on_chunk(i)
    return "".join(text)


def test_the_api_requires_its_key(stack: Stack):
    assert httpx.get(f"{stack.base}/v1/models", timeout=10).status_code == 401
    wrong = httpx.get(f"{stack.base}/v1/models", headers={"Authorization": "Bearer sk-wrong"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"]
    assert httpx.get(f"{stack.base}/health", timeout=10).status_code == 200  # open, for health checks


def test_models_answers_the_readme_curl(stack: Stack, client: openai.OpenAI, smollm2):
    curl = _command(stack.commands, "/v1/models").replace("homeserver:8000", f"127.0.0.1:{stack.api_port}")
    listed = json.loads(stack.sh(curl, capture=True).stdout)
    card = listed["data"][0]
    assert card["id"] == smollm2.name.removesuffix(".gguf") and "smollm2" in card["aliases"]
    assert [m.id for m in client.models.list().data] == [card["id"]]


def test_a_greedy_chat_answer_equals_the_unsplit_model(client: openai.OpenAI, expected):
    resp = _chat(client)
    assert resp.usage.completion_tokens == MAX_NEW and resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == expected[MAX_NEW]


def test_a_streamed_answer_equals_it(client: openai.OpenAI, expected):
    assert _stream(client) == expected[MAX_NEW]


def test_three_agents_replan_and_answer_the_same(stack: Stack, client: openai.OpenAI, expected):
    before = stack.wait_plan(2)
    running = set(stack.containers("controller") + stack.containers("agent"))
    stack.sh(_command(stack.commands, "--scale agent=3"), timeout=600)
    stack.wait_healthy(3, 600)
    assert running < set(stack.containers("controller") + stack.containers("agent"))  # none recreated
    after = stack.wait_plan(3, other_than=before["plan"]["plan_id"])
    assert len([a for a in after["agents"] if a["status"] != "offline"]) == 3
    assert _chat(client).choices[0].message.content == expected[MAX_NEW]


def test_an_agent_killed_mid_answer_and_the_answer_completes_identically(stack: Stack, client, expected):
    c = stack.wait_plan(3)
    in_plan = [a for a in c["agents"] if a["in_plan"]]
    victim = next((a for a in in_plan if not a["head"]), in_plan[0])
    container = next(cid for cid in stack.containers("agent") if victim["name"].startswith(cid[:12]))
    killed = threading.Event()

    def kill_midway(i: int) -> None:
        if i == KILL_MAX_NEW // 4 and not killed.is_set():
            stack.engine.docker("kill", container, capture=True)
            killed.set()

    text = _stream(client, KILL_MAX_NEW, on_chunk=kill_midway)
    assert killed.is_set(), "the answer ended before the kill"
    assert text == expected[KILL_MAX_NEW]  # no token repeated, lost or changed
    after = stack.wait_plan(2, other_than=c["plan"]["plan_id"])
    assert victim["name"] not in after["plan"]["ring"]
    assert _chat(client).choices[0].message.content == expected[MAX_NEW]


def test_agent_healthchecks_pass_without_handshake_warnings(stack: Stack):
    for cid in stack.containers("agent"):
        state = json.loads(
            stack.engine.docker("inspect", "--format", "{{json .State.Health}}", cid, capture=True).stdout
        )
        assert state["Status"] == "healthy" and any(p["ExitCode"] == 0 for p in state["Log"]), state
    logs = stack.compose("logs", "agent")
    assert "handshake failed" not in logs


def test_anonymous_mqtt_is_refused(stack: Stack):
    sub = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(stack.mqtt_port), "-t", "#", "-C", "1", "-W", "5"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert sub.returncode != 0 and "not authori" in (sub.stdout + sub.stderr).lower(), sub


def test_down_leaves_no_containers_networks_or_volumes(stack: Stack):
    stack.sh(_command(stack.commands, "down -v"), timeout=300)
    stack.down = True
    docker = stack.engine.docker
    assert docker("ps", "-aq", capture=True).stdout.split() == []
    networks = docker("network", "ls", "--format", "{{.Name}}", capture=True).stdout.split()
    assert sorted(networks) == ["bridge", "host", "none"]
    assert docker("volume", "ls", "-q", capture=True).stdout.split() == []
    assert os.path.exists(stack.folder / "docker" / "secrets" / "api_key")  # the secrets stay on the host

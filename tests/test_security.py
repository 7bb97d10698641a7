"""MQTT logins and the ACL on a real mosquitto running the repository's docker/mosquitto config, and the API key
end to end (`homering up` against that broker)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiomqtt
import httpx
import openai
import psutil
import pytest

from homering.client.local import stop_processes
from homering.errors import HomeringError
from homering.transport import mqtt
from homering.transport.broker import free_port
from homering.transport.mqtt import BrokerAuth, BrokerURL
from tests.conftest import run_mosquitto, wait_healthy

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO_DIR = REPO / "docker" / "mosquitto"
PASSWORDS = {
    "controller": "c0ntroller-pw",
    "laptop": "l4ptop-pw",
    "agent": "sh4red-agent-pw",
    "chat": "ch4t-pw",
    "homeassistant": "h0me-4ssistant-pw",
}


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()), None
    )
    if not found:
        pytest.fail(f"{name} is not installed: run 'make test' (it installs mosquitto)")
    return found


def broker_conf(port: int, passwd: Path, acl: Path) -> str:
    """The repository's mosquitto.conf on a loopback port, with a test password file, ``acl`` (a copy of
    docker/mosquitto/acl) and no persistence; everything else (allow_anonymous …) as shipped."""
    out = []
    for line in (MOSQUITTO_DIR / "mosquitto.conf").read_text().splitlines():
        key = line.split(" ", 1)[0]
        if key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key == "password_file":
            line = f"password_file {passwd}"
        elif key == "acl_file":
            line = f"acl_file {acl}"
        elif key == "persistence":
            line = "persistence false"
        elif key in ("persistence_location", "log_dest"):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def secured() -> BrokerURL:
    """mosquitto with the repository's config and ACL, users from a password file hashed by mosquitto_passwd."""
    # mosquitto started as root reads its files as the mosquitto user: a folder anyone can read
    folder = Path(tempfile.mkdtemp(prefix="homering-mosquitto-"))
    folder.chmod(0o755)
    acl = folder / "acl"
    shutil.copyfile(MOSQUITTO_DIR / "acl", acl)
    acl.chmod(0o644)
    passwd = folder / "passwd"
    passwd.write_text("".join(f"{u}:{p}\n" for u, p in PASSWORDS.items()))
    subprocess.run([_binary("mosquitto_passwd"), "-U", str(passwd)], check=True)
    assert "c0ntroller-pw" not in passwd.read_text()  # hashed in place
    passwd.chmod(0o644)
    try:
        with run_mosquitto(folder, lambda port: broker_conf(port, passwd, acl)) as url:
            assert "allow_anonymous false" in (folder / "mosquitto.conf").read_text()
            yield url
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def as_user(broker: BrokerURL, user: str | None, password: str | None = None) -> BrokerURL:
    pw = PASSWORDS.get(user) if password is None else password
    return broker.with_auth(BrokerAuth(user, pw) if user else BrokerAuth())


async def _connect(broker: BrokerURL) -> None:
    try:
        async with mqtt.client(broker):
            pass
    except aiomqtt.MqttError as exc:
        raise mqtt.connect_error(broker, exc) from None


# ------------------------------------------------------------------ logins
def test_anonymous_client_is_refused(secured):
    with pytest.raises(HomeringError, match="refused an anonymous login"):
        asyncio.run(_connect(as_user(secured, None)))


def test_right_password_is_accepted(secured):
    asyncio.run(_connect(as_user(secured, "controller")))
    asyncio.run(_connect(as_user(secured, "laptop")))


def test_wrong_password_is_refused(secured):
    with pytest.raises(HomeringError, match="refused user 'controller'"):
        asyncio.run(_connect(as_user(secured, "controller", "not-the-password")))
    with pytest.raises(HomeringError, match="refused user 'nobody'"):
        asyncio.run(_connect(as_user(secured, "nobody", "whatever")))


# ------------------------------------------------------------------ the private broker of `homering up`
def _sub_everything(broker: BrokerURL, user: str | None = None, password: str | None = None):
    """mosquitto_sub -t '#' for 2 s, as anyone on this machine could run it."""
    args = [_binary("mosquitto_sub"), "-h", broker.host, "-p", str(broker.port), "-t", "#", "-W", "2", "-v"]
    if user:
        args += ["-u", user, "-P", password]
    return subprocess.run(args, capture_output=True, text=True, timeout=30)


def test_ups_own_mosquitto_accepts_only_the_clusters_processes(smollm2):
    """`up`'s broker (LocalCluster without --broker) refuses anonymous and wrong logins; its processes work."""
    from homering.client.chat import ask
    from homering.client.client import ClusterClient, new_request_id
    from homering.client.local import LocalCluster
    from homering.wire import ChatMessage, GenerateRequest, Sampling

    with LocalCluster(smollm2, n_agents=1, threads=1, n_ctx=256) as cluster:
        broker = cluster.broker
        assert broker.auth.username and broker.auth.password
        for user, password in ((None, None), (broker.auth.username, "wrong")):
            with pytest.raises(HomeringError, match="refused"):
                asyncio.run(_connect(broker.with_auth(BrokerAuth(user, password) if user else BrokerAuth())))
        snoop = _sub_everything(broker)
        assert snoop.returncode != 0 and "homering/" not in snoop.stdout

        async def answer():
            async with ClusterClient(broker) as client:
                await client.wait_ready(120)
                return await ask(
                    client,
                    GenerateRequest(
                        request_id=new_request_id(),
                        messages=[ChatMessage(role="user", content="Hi")],
                        sampling=Sampling(max_tokens=4, temperature=0),
                    ),
                )

        assert asyncio.run(answer()).token_ids
        cluster.check()


def test_embedded_amqtt_broker_with_credentials_refuses_anonymous_clients():
    """`homering broker` (amqtt, where mosquitto is missing) with $HOMERING_MQTT_USER/PASSWORD: that login only."""
    from homering.transport.broker import broker_credentials, wait_for_port

    auth, port = broker_credentials(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "homering", "broker", "--port", str(port)],
        env={**os.environ, **auth.env()},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for_port("127.0.0.1", port), "the amqtt broker did not start"
        broker = BrokerURL("127.0.0.1", port)
        for bad in (BrokerAuth(), BrokerAuth(auth.username, "wrong")):
            with pytest.raises(HomeringError, match="refused"):
                asyncio.run(_connect(broker.with_auth(bad)))
        asyncio.run(_connect(broker.with_auth(auth)))
    finally:
        stop_processes([proc], 5)


def _homering(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "homering", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("HOMERING_MQTT")}, **(env or {})},
    )


def test_cli_wrong_password_is_one_line_and_exit_2(secured, tmp_path):
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password\n")
    res = _homering("chat", "--broker", str(secured), "--user", "chat", "--password-file", str(wrong))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("homering: error: ") and "refused user 'chat'" in lines[0], (
        res.stderr
    )


def test_cli_missing_password_file_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "nope"
    for argv in (
        ["agent", "--broker", "mqtt://127.0.0.1:1", "--user", "laptop", "--password-file", str(missing)],
        ["chat", "--user", "chat", "--password-file", str(missing)],
    ):
        res = _homering(*argv)
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [
            f"homering: error: cannot read the MQTT password file {missing}: No such file or directory"
        ]
    # the same through the environment
    res = _homering("chat", env={"HOMERING_MQTT_USER": "chat", "HOMERING_MQTT_PASSWORD_FILE": str(missing)})
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_broker_url_schemes_and_credentials(tmp_path):
    assert str(BrokerURL.parse("mqtts://broker.lan")) == "mqtts://broker.lan:8883"
    assert BrokerURL.parse("mqtts://broker.lan").tls and not BrokerURL.parse("mqtt://broker.lan").tls
    assert str(BrokerURL.parse("mqtt://broker.lan")) == "mqtt://broker.lan:1883"
    with pytest.raises(HomeringError, match="no credentials in the broker URL"):
        BrokerURL.parse("mqtt://u:secret@broker.lan")
    with pytest.raises(HomeringError, match="mqtt://HOST:PORT or mqtts://HOST:PORT"):
        BrokerURL.parse("http://broker.lan")
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    auth = BrokerAuth.load("laptop", pw, environ={})
    assert (auth.username, auth.password) == ("laptop", "s3cret")
    assert "s3cret" not in repr(auth) and "s3cret" not in str(BrokerURL.parse("mqtt://h", auth))
    assert BrokerAuth.load(environ={"HOMERING_MQTT_USER": "a", "HOMERING_MQTT_PASSWORD": "b"}).password == "b"
    with pytest.raises(HomeringError, match="needs a user name"):
        BrokerAuth.load(None, pw, environ={})
    with pytest.raises(HomeringError, match="is empty"):
        (tmp_path / "empty").write_text("\n")
        BrokerAuth.load("laptop", tmp_path / "empty", environ={})
    with pytest.raises(HomeringError, match="goes with an mqtts://"):
        BrokerURL.parse("mqtt://h", BrokerAuth(ca_file=str(pw)))


# ------------------------------------------------------------------ the ACL
async def _deliveries(
    broker: BrokerURL,
    publisher: str,
    publishes: list[tuple[str, str]],
    marker: tuple[str, str],
    reader: str = "controller",
) -> list[tuple[str, str]]:
    """What a ``reader``-user subscriber on ``homering/#`` and ``homeassistant/#`` receives of ``publishes``
    then ``marker``, all published in that order by ``publisher``; returns once the marker arrives (a denied
    publish is dropped silently with MQTT 3.1.1, and one broker delivers one publisher's messages in order)."""
    got: list[tuple[str, str]] = []
    async with mqtt.client(as_user(broker, reader)) as sub:
        await sub.subscribe("homering/#", qos=1)
        await sub.subscribe("homeassistant/#", qos=1)
        async with mqtt.client(as_user(broker, publisher)) as pub:
            for topic, payload in [*publishes, marker]:
                await pub.publish(topic, payload.encode(), qos=1)

        async def read():
            async for m in sub.messages:
                got.append((str(m.topic), m.payload.decode()))
                if got[-1] == marker:
                    return

        await asyncio.wait_for(read(), 10)
    return got


def test_agent_cannot_publish_a_plan_but_can_publish_its_own_topics(secured):
    fake = [
        ("homering/plan", "fake plan"),
        ("homering/controller/status", "fake status"),
        ("homering/agents/desktop/status", "speaking for another agent"),
        ("homering/agents/desktop/generate", "a job for another agent"),
        ("homering/requests", "a request"),
    ]
    allowed = [("homering/agents/laptop/profile", "own profile"), ("homering/streams/r1", "a token")]
    got = asyncio.run(_deliveries(secured, "laptop", fake + allowed, ("homering/agents/laptop/status", "online")))
    assert got == [*allowed, ("homering/agents/laptop/status", "online")]


def test_shared_agent_account_cannot_publish_a_plan(secured):
    got = asyncio.run(
        _deliveries(
            secured,
            "agent",
            [("homering/plan", "fake plan"), ("homering/agents/agent-7/generate", "a job")],
            ("homering/agents/agent-7/status", "online"),
        )
    )
    assert got == [("homering/agents/agent-7/status", "online")]


def test_shared_agent_account_cannot_touch_the_controllers_home_assistant_sensors(secured):
    """Stack agents share one account: they may publish agents' discovery configs, never the controller's."""
    from homering.integrations.homeassistant import CONTROLLER_NODE, agent_node_id

    mine = (f"homeassistant/sensor/{agent_node_id('host-7')}/status/config", "{}")
    got = asyncio.run(
        _deliveries(
            secured,
            "agent",
            [(f"homeassistant/sensor/{CONTROLLER_NODE}/state/config", "{}")],
            mine,
            reader="homeassistant",
        )
    )
    assert got == [mine]


def test_chat_user_can_send_requests_and_cancels_only(secured):
    got = asyncio.run(
        _deliveries(
            secured,
            "chat",
            [
                ("homering/plan", "fake plan"),
                ("homering/agents/chat2/status", "x"),
                ("homering/agents/laptop/cancel", "stop it"),
            ],
            ("homering/requests", "a request"),
        )
    )
    assert got == [("homering/agents/laptop/cancel", "stop it"), ("homering/requests", "a request")]


def test_controller_can_publish_the_plan(secured):
    got = asyncio.run(
        _deliveries(secured, "controller", [("homering/plan", "plan")], ("homering/agents/laptop/generate", "job"))
    )
    assert got == [("homering/plan", "plan"), ("homering/agents/laptop/generate", "job")]


# ------------------------------------------------------------------ the API key, end to end
API_KEY = "sk-homering-test-0123456789"


@pytest.fixture(scope="module")
def keyed_api(smollm2, secured, tmp_path_factory):
    """`homering up --agents 1` on the secured broker as user controller (credentials from a file), the API
    with a key from a file; yields (base URL, the up process)."""
    folder = tmp_path_factory.mktemp("keyed")
    (folder / "mqtt-password").write_text(PASSWORDS["controller"] + "\n")
    (folder / "api-key").write_text(API_KEY + "\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HOMERING_MQTT", "HOMERING_API_KEY"))}
    with open(folder / "up.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "homering",
                "up",
                "--agents",
                "1",
                "--model",
                str(smollm2),
                "--broker",
                str(secured),
                "--user",
                "controller",
                "--password-file",
                str(folder / "mqtt-password"),
                "--threads",
                "1",
                "--ctx",
                "512",
                "--api-port",
                str(port),
                "--api-key-file",
                str(folder / "api-key"),
                "--no-chat",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, [proc], log_path=folder / "up.log")
            yield base, proc
        finally:
            stop_processes([proc], 30)


def _assert_401(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key" and err["message"]
    assert API_KEY not in resp.text


def test_api_requires_the_key(keyed_api):
    base, _ = keyed_api
    wrong = {"Authorization": "Bearer sk-wrong"}
    right = {"Authorization": f"Bearer {API_KEY}"}
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/v1/cluster"),
        ("GET", "/metrics"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    ):
        _assert_401(httpx.request(method, base + path, json={}))
        _assert_401(httpx.request(method, base + path, json={}, headers=wrong))
        _assert_401(httpx.request(method, base + path, json={}, headers={"Authorization": API_KEY}))  # no scheme
    models = httpx.get(f"{base}/v1/models", headers=right)
    assert models.status_code == 200 and models.json()["data"]
    assert httpx.get(f"{base}/metrics", headers=right).status_code == 200
    assert httpx.get(f"{base}/health").status_code == 200  # open for health checks


def test_openai_client_with_and_without_the_key(keyed_api):
    base, _ = keyed_api
    good = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    model = good.models.list().data[0].id
    resp = good.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    assert resp.usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0).models.list()


def test_secrets_are_not_on_any_command_line(keyed_api):
    """homering up hands the MQTT password and the API key to its children by environment only."""
    _, proc = keyed_api
    children = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *children]:
        argv = " ".join(p.cmdline())
        assert PASSWORDS["controller"] not in argv and API_KEY not in argv, argv
    assert any(re.search(r"\bcontroller\b", " ".join(c.cmdline())) for c in children)
    assert any(re.search(r"\bagent\b", " ".join(c.cmdline())) for c in children)

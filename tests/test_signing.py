"""The cluster key: loading it, the data-plane handshake, frame validation, signed MQTT orders — in units, and
against a real keyed cluster on mosquitto."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from typing import ClassVar

import aiomqtt
import numpy as np
import pytest

from homering.client.chat import ask
from homering.client.client import ClusterClient, new_request_id
from homering.errors import HomeringError
from homering.transport.links import LinkServer, connect_link, measure_link, recv_frame, recv_group, send_frame
from homering.wire import (
    HEADER,
    MAX_PAYLOAD,
    BadSignature,
    ChatMessage,
    ControllerStatus,
    DType,
    FrameError,
    FrameHeader,
    FrameKind,
    GenerateJob,
    GenerateRequest,
    HandshakeError,
    LinkProbe,
    Message,
    Sampling,
    Topics,
)
from homering.wire.base import MESSAGE_MAC_LABEL
from homering.wire.frames import FRAME_VERSION, Frame
from homering.wire.handshake import LINK_ACCEPT, LINK_HELLO, LINK_REPLY, client_handshake, server_handshake
from homering.wire.security import (
    ENV_KEY,
    ENV_KEY_FILE,
    MAX_AGE_S,
    ClusterKey,
    child_environment,
    generate_secret,
    load_key,
)

GREEDY = Sampling(max_tokens=24, temperature=0)
KEY = ClusterKey("a" * 32, source="test A")
OTHER = ClusterKey("b" * 32, source="test B")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


def chat_request(text: str) -> GenerateRequest:
    return GenerateRequest(
        request_id=new_request_id(), messages=[ChatMessage(role="user", content=text)], sampling=GREEDY
    )


# ------------------------------------------------------------------ the key
def test_key_comes_from_the_file_option_then_the_environment(tmp_path):
    f = tmp_path / "k"
    f.write_text("  file-secret-0123456789\n")
    f.chmod(0o600)
    g = tmp_path / "g"
    g.write_text("env-file-secret-0123456789")
    env = {ENV_KEY: "env-secret-0123456789", ENV_KEY_FILE: str(g)}
    assert load_key(None, {}) is None
    assert load_key(str(f), env).text == "file-secret-0123456789"  # stripped; the option wins
    assert load_key(None, env).text == "env-file-secret-0123456789"
    assert load_key(None, {ENV_KEY: "env-secret-0123456789"}).text == "env-secret-0123456789"
    with pytest.raises(HomeringError, match="bytes"):
        load_key(None, {ENV_KEY: "short"})
    with pytest.raises(HomeringError, match="cannot read"):
        load_key(str(tmp_path / "missing"), {})
    assert "file-secret" not in repr(load_key(str(f), env))


def test_children_get_exactly_the_given_key_in_their_environment():
    inherited = {ENV_KEY: "inherited-secret-0123", ENV_KEY_FILE: "/somewhere", "PATH": "/bin"}
    assert child_environment(None, inherited) == {"PATH": "/bin"}
    assert child_environment(KEY, inherited) == {"PATH": "/bin", ENV_KEY: KEY.text}
    assert len(generate_secret()) == 64 and generate_secret() != generate_secret()


# ------------------------------------------------------------------ handshake
def _pair():
    a, b = socket.socketpair()
    return a, b


def _handshake(server_key, client_key, timeout=2.0):
    """Run both ends on a socketpair; (server error, client error)."""
    s, c = _pair()
    errors = {}

    def serve():
        try:
            server_handshake(s, server_key, timeout)
        except HandshakeError as exc:
            errors["server"] = exc
            s.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        client_handshake(c, client_key, timeout)
    except HandshakeError as exc:
        errors["client"] = exc
        c.close()
    t.join(5)
    assert not t.is_alive()
    return errors.get("server"), errors.get("client")


def test_handshake_passes_with_the_same_key_or_none_and_fails_fast_otherwise():
    assert _handshake(KEY, KEY) == (None, None)
    assert _handshake(None, None) == (None, None)
    for server_key, client_key in ((KEY, OTHER), (KEY, None), (None, KEY)):
        t0 = time.monotonic()
        server_err, client_err = _handshake(server_key, client_key)
        assert time.monotonic() - t0 < 1.0  # no end waits for a timeout
        assert client_err is not None, (server_key, client_key)
        assert server_err is not None or server_key is None  # a keyless server cannot tell; its client hangs up
    _, client_err = _handshake(KEY, None)
    assert "requires a cluster key" in str(client_err)
    _, client_err = _handshake(None, KEY)
    assert "no cluster key" in str(client_err)
    server_err, _ = _handshake(KEY, OTHER)
    assert "bad MAC" in str(server_err)


def _hung_up(sock: socket.socket) -> bool:
    """Read until the peer closes; True when it did (FIN or RST) within a few seconds."""
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def test_a_recorded_handshake_cannot_be_replayed():
    """A genuine handshake recorded by a relay in the middle fails when replayed, in either direction:
    the other end's nonce is new."""
    srv = LinkServer("127.0.0.1", 0, lambda sock: recv_frame(sock), key=KEY)
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as upstream:
            fake_server, client = socket.socketpair()
            hello = upstream.recv(LINK_HELLO.size, socket.MSG_WAITALL)
            fake_server.sendall(hello)
            box = {}

            def relay():
                box["reply"] = fake_server.recv(LINK_REPLY.size, socket.MSG_WAITALL)
                upstream.sendall(box["reply"])
                box["accept"] = upstream.recv(LINK_ACCEPT.size, socket.MSG_WAITALL)
                fake_server.sendall(box["accept"])

            t = threading.Thread(target=relay)
            t.start()
            client_handshake(client, KEY)  # genuine, through the relay
            t.join(5)
        # the client's recorded reply against a new session of the server
        with socket.create_connection(("127.0.0.1", srv.port)) as replay:
            assert replay.recv(LINK_HELLO.size, socket.MSG_WAITALL) != hello
            replay.sendall(box["reply"])
            assert _hung_up(replay)
        # the server's recorded hello and accept against a new client
        fake_server, client = socket.socketpair()
        fake_server.sendall(hello)

        def replay_server():
            fake_server.recv(LINK_REPLY.size, socket.MSG_WAITALL)
            fake_server.sendall(box["accept"])

        t = threading.Thread(target=replay_server)
        t.start()
        with pytest.raises(HandshakeError, match="bad MAC"):
            client_handshake(client, KEY)
        t.join(5)
        # the server kept accepting
        with connect_link("127.0.0.1", srv.port, key=KEY) as ok:
            send_frame(ok, Frame.pong())
    finally:
        srv.close()


def test_handshake_times_out_on_a_silent_peer():
    s, c = _pair()
    s2, c2 = _pair()
    t0 = time.monotonic()
    with pytest.raises(HandshakeError, match="timed out"):
        server_handshake(s, KEY, timeout=0.2)
    with pytest.raises(HandshakeError, match="timed out"):
        client_handshake(c2, KEY, timeout=0.2)
    assert time.monotonic() - t0 < 2
    for x in (s, c, s2, c2):
        x.close()


def test_link_server_drops_bad_peers_and_keeps_serving():
    def pong(sock):
        while recv_group(sock) is not None:
            send_frame(sock, Frame.pong())

    srv = LinkServer("127.0.0.1", 0, pong, key=KEY)
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:
            s.sendall(b"GARBAGE!" * 20)
        for bad in (None, OTHER):
            with pytest.raises(HandshakeError):
                connect_link("127.0.0.1", srv.port, key=bad, timeout=2)
        ms, mbps = measure_link("127.0.0.1", srv.port, key=KEY, probe_bytes=1 << 16)
        assert ms > 0 and mbps > 0
        with pytest.raises(ConnectionError):
            measure_link("127.0.0.1", srv.port, key=OTHER, probe_bytes=1 << 16)
    finally:
        srv.close()


# ------------------------------------------------------------------ frames
def _header(
    kind=FrameKind.FORWARD,
    dtype=DType.F32,
    n_tokens=1,
    n_embd=4,
    payload_len=None,
    *,
    seq_id=0,
    pos=0,
    version=FRAME_VERSION,
    flags=0,
    reserved=0,
):
    if payload_len is None:
        payload_len = n_tokens * (n_embd or 1) * 4
    return HEADER.pack(b"HRNG", version, kind, dtype, flags, 1, seq_id, 0, reserved, pos, n_tokens, n_embd, payload_len)


@pytest.mark.parametrize(
    "raw, match",
    [
        (_header(n_tokens=2, n_embd=4, payload_len=31), "payload"),  # mis-sized hidden states
        (_header(dtype=DType.TOKENS, n_tokens=3, n_embd=0, payload_len=8), "payload"),  # mis-sized tokens
        (_header(n_tokens=1 << 16, n_embd=8192), "too large"),  # 2 GiB
        (_header(n_tokens=1, n_embd=1 << 16), "too large"),
        (_header(dtype=DType.TOKENS, n_tokens=(1 << 16) + 1, n_embd=0), "too large"),
        (_header(n_tokens=0, n_embd=4), "empty"),
        (_header(n_tokens=2, n_embd=0, payload_len=8), "empty"),
        (_header(dtype=DType.TOKENS, n_tokens=2, n_embd=3, payload_len=8), "n_embd"),
        (_header(kind=9), "FrameKind"),
        (_header(dtype=9), "DType"),
        (_header(version=FRAME_VERSION + 1), "version"),
        (_header(kind=FrameKind.FORWARD, dtype=DType.TEXT, n_tokens=0, n_embd=0, payload_len=5), "cannot carry"),
        (_header(kind=FrameKind.ERROR, dtype=DType.TEXT, n_tokens=0, n_embd=0, payload_len=1 << 20), "at most"),
        (_header(kind=FrameKind.PING, dtype=DType.BYTES, n_tokens=0, n_embd=0, payload_len=(1 << 24) + 1), "at most"),
        (_header(kind=FrameKind.KV_REMOVE, dtype=DType.NONE, n_tokens=0, n_embd=0, payload_len=4), "at most"),
        (_header(kind=FrameKind.PONG, dtype=DType.NONE, n_tokens=3, n_embd=0, payload_len=0), "shape"),
        (_header(seq_id=1 << 20), "sequence"),
        (_header(pos=(1 << 31) - 1), "int32"),
        (_header(reserved=7), "reserved"),
        (_header(flags=0x80), "flags"),
        (_header(kind=FrameKind.PING, dtype=DType.NONE, n_tokens=0, n_embd=0, flags=1), "flags"),
    ],
)
def test_frame_header_validation(raw, match):
    with pytest.raises(FrameError, match=match):
        FrameHeader.unpack(raw)


def test_valid_frames_pass_and_non_finite_hidden_states_do_not():
    frames = [
        Frame.forward(3, 1, 7, np.arange(5, dtype=np.int32)),
        Frame.forward(3, 1, 7, np.ones((2, 576), dtype=np.float32)),
        Frame.kv_remove(3, 1, 0),
        Frame.error(3, 1, "é" * 5000),
        Frame.ping(),
        Frame.ping(1000),
        Frame.pong(),
    ]
    a, b = socket.socketpair()
    with a, b:
        for f in frames:
            send_frame(a, f)
            got = recv_frame(b)
            assert got.header == FrameHeader.unpack(f.header.pack())
        for bad in (np.nan, np.inf, -np.inf):
            x = np.ones((2, 576), dtype=np.float32)
            x[1, 100] = bad
            send_frame(a, Frame.forward(3, 1, 7, x))
            with pytest.raises(FrameError, match="NaN or Inf"):
                recv_frame(b)
    assert MAX_PAYLOAD >= 64 * 8192 * 4 * 8  # a 512-token micro-batch of an 8192-wide model fits


# ------------------------------------------------------------------ signed messages
def _signed_at(msg, key, ts_ms: int) -> bytes:
    body = msg.model_dump_json().encode()
    nonce = os.urandom(16).hex().encode()
    tag = key.mac(MESSAGE_MAC_LABEL, type(msg).__name__.encode(), str(ts_ms).encode(), nonce, body).hex()
    return body[:-1] + b',"_auth":{"ts":%d,"nonce":"%s","mac":"%s"}}' % (ts_ms, nonce, tag.encode())


def test_signed_orders_verify_once_and_only_with_the_key():
    job = GenerateJob(request_id="r1", plan_id="p", prompt_token_ids=[1, 2], sampling=GREEDY)
    key = ClusterKey("c" * 32)  # a fresh replay memory
    signed = job.dump(key)
    assert GenerateJob.load(signed, key=key) == job
    with pytest.raises(BadSignature, match="replayed"):
        GenerateJob.load(signed, key=key)
    with pytest.raises(BadSignature, match="unsigned"):
        GenerateJob.load(job.dump(), key=key)
    with pytest.raises(BadSignature, match="bad signature"):
        GenerateJob.load(job.dump(OTHER), key=key)
    with pytest.raises(BadSignature, match="bad signature"):
        GenerateJob.load(job.dump(key).replace(b'"r1"', b'"r2"'), key=key)
    with pytest.raises(BadSignature, match="no cluster key"):
        GenerateJob.load(job.dump(key), key=None)
    old = int((time.time() - MAX_AGE_S - 10) * 1000)
    with pytest.raises(BadSignature, match="stale"):
        GenerateJob.load(_signed_at(job, key, old), key=key)
    with pytest.raises(BadSignature, match="future"):
        GenerateJob.load(_signed_at(job, key, int((time.time() + MAX_AGE_S + 10) * 1000)), key=key)

    # a signature does not carry over to another message type with the same body
    class Order(Message):  # a signed kind whose body is a valid GenerateRequest body
        SIGNED: ClassVar[bool] = True
        request_id: str

    assert GenerateRequest.load(Order(request_id="x").dump(), key=None).request_id == "x"  # same body
    with pytest.raises(BadSignature, match="bad signature"):
        GenerateRequest.load(Order(request_id="x").dump(key), key=key)
    # unsigned kinds ignore the key
    assert GenerateJob.load(job.dump(None), key=None) == job


def test_retained_state_is_signed_but_not_aged_and_stays_plain_json():
    status = ControllerStatus(state="ready", plan_id="p1")
    old = _signed_at(status, KEY, int((time.time() - 86400) * 1000))  # a day-old retained status
    assert ControllerStatus.load(old, key=KEY) == status
    assert ControllerStatus.load(old, key=KEY) == status  # retained state is delivered again and again
    assert json.loads(status.dump(KEY))["state"] == "ready"  # Home Assistant's templates still read it


# ------------------------------------------------------------------ a keyed cluster
async def _drain(client: aiomqtt.Client, seconds: float) -> list[aiomqtt.Message]:
    """The messages ``client`` receives within ``seconds``."""
    got = []
    try:
        async with asyncio.timeout(seconds):
            async for m in client.messages:
                got.append(m)
    except TimeoutError:
        pass
    return got


def test_keyed_cluster_ignores_unsigned_and_forged_orders(keyed_cluster, smollm2_ref):
    cluster, key = keyed_cluster, keyed_cluster.key

    async def go():
        async with ClusterClient(cluster.broker, key=key) as client:
            await client.wait_ready()
            plan = client.plan
            head = plan.head.name
            fake_id = new_request_id()
            async with aiomqtt.Client(cluster.broker.host, cluster.broker.port) as bad:
                await bad.subscribe(Topics.stream(fake_id), qos=1)
                await bad.subscribe(Topics.generate(head), qos=1)
                forged = plan.model_copy(update={"plan_id": "forged", "ring": list(reversed(plan.ring))})
                job = GenerateJob(
                    request_id=fake_id, plan_id=plan.plan_id, seq_id=0, prompt_token_ids=[1, 2, 3], sampling=GREEDY
                )
                for payload in (forged.dump(), forged.dump(OTHER)):
                    await bad.publish(Topics.PLAN, payload, qos=1)
                await bad.publish(Topics.CONTROLLER, ControllerStatus(state="ready", plan_id="forged").dump(), qos=1)
                for payload in (job.dump(), job.dump(OTHER)):
                    await bad.publish(Topics.generate(head), payload, qos=1)
                await bad.publish(
                    Topics.probe(plan.ring[0].name), LinkProbe(probe_id="x", host="127.0.0.1", port=9).dump(), qos=1
                )
                await bad.publish(Topics.REQUESTS, GenerateRequest(request_id=fake_id, prompt="hi").dump(), qos=1)
                # a genuine job, recorded on its way to the head and replayed
                genuine = await ask(client, chat_request("What is the capital of France?"))
                got = await _drain(bad, 1.0)
                recorded = [
                    m.payload
                    for m in got
                    if m.topic.matches(Topics.generate(head)) and fake_id.encode() not in m.payload
                ]
                assert len(recorded) == 1
                replay_id = json.loads(recorded[0])["request_id"]
                await bad.subscribe(Topics.stream(replay_id), qos=1)
                await bad.publish(Topics.generate(head), recorded[0], qos=1)
                got += await _drain(bad, 2.0)
                seen = [m.topic.value for m in got if m.topic.value.startswith(Topics.stream(""))]
            assert seen == []  # neither the fake job, the fake request nor the replay produced a stream
            assert client.plan.plan_id == plan.plan_id
            after = await ask(client, chat_request("List three prime numbers."))
            return genuine, after

    genuine, after = run(go())
    for answer in (genuine, after):
        smollm2_ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, 24)
    cluster.check()
    log = cluster.log_path.read_text()
    assert log.count("unsigned Plan") >= 3 and "bad signature on Plan" in log  # every agent dropped it
    assert "unsigned ControllerStatus" in log
    assert "unsigned GenerateJob" in log and "bad signature on GenerateJob" in log
    assert "unsigned LinkProbe" in log and "unsigned GenerateRequest" in log
    assert "GenerateJob refused: replayed" in log
    assert "Traceback" not in log


def test_keyed_cluster_data_ports_refuse_strangers_and_bad_frames(keyed_cluster, smollm2_ref):
    cluster, key = keyed_cluster, keyed_cluster.key

    async def go():
        async with ClusterClient(cluster.broker, key=key) as client:
            await client.wait_ready()
            target = client.plan.ring[1]
            addr = (target.host, target.data_port)
            before = cluster.log_path.read_text().count("dropping data link")

            def attack():
                with socket.create_connection(addr) as s:  # no handshake at all
                    s.sendall(b"GARBAGE!" * 20)
                    assert _hung_up(s)
                for bad in (None, OTHER):
                    with pytest.raises(HandshakeError):
                        connect_link(*addr, key=bad, timeout=2)
                n_embd = 576
                nan = np.ones((1, n_embd), dtype=np.float32)
                nan[0, 3] = np.nan
                frames = [
                    b"GARBAGE!" * 20,
                    _header(n_tokens=1 << 16, n_embd=8192) + b"x" * 1000,  # says 2 GiB
                    _header(dtype=DType.TOKENS, n_tokens=3, n_embd=0, payload_len=8) + b"\0" * 8,
                    _header(n_tokens=1, n_embd=n_embd, payload_len=n_embd * 4) + nan.tobytes(),
                    _header(n_tokens=1, n_embd=n_embd, payload_len=n_embd * 4)
                    + np.full((1, n_embd), np.inf, dtype=np.float32).tobytes(),
                    _header(kind=11),
                    _header(seq_id=1 << 30),
                ]
                for raw in frames:
                    with connect_link(*addr, key=key, timeout=5) as s:
                        s.sendall(raw)
                        assert _hung_up(s)
                # a well-formed frame naming a sequence no window has: the agent answers with an error frame
                # downstream (llama.cpp would have aborted the process)
                with connect_link(*addr, key=key, timeout=5) as s:
                    send_frame(s, Frame.kv_remove(0xFFFFFF, 200, 0))
                time.sleep(0.5)

            await asyncio.to_thread(attack)
            after = await ask(client, chat_request("Write a haiku about the sea."))
            dropped = cluster.log_path.read_text().count("dropping data link") - before
            return after, dropped

    after, dropped = run(go())
    smollm2_ref.check_answer(after.prompt_token_ids, after.token_ids, after.finish_reason, 24)
    cluster.check()
    assert dropped >= 10
    log = cluster.log_path.read_text()
    assert "handshake failed" in log and "NaN or Inf" in log and "too large" in log
    assert "Traceback" not in log


def test_a_keyless_client_is_told_about_the_key(keyed_cluster):
    async def go():
        async with ClusterClient(keyed_cluster.broker, key=keyed_cluster.key) as client:
            await client.wait_ready()
        async with ClusterClient(keyed_cluster.broker) as client:  # the retained status is signed: dropped
            await client.wait_ready(timeout=3)

    with pytest.raises(HomeringError, match="cluster key"):
        run(go())


def test_a_chat_and_an_agent_without_the_key_exit_with_one_line_that_names_it(keyed_cluster):
    """Against a keyed cluster, a keyless `homering chat` and `homering agent` give up at once (they hung)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in (ENV_KEY, ENV_KEY_FILE)}
    broker = str(keyed_cluster.broker)
    runs = {
        "chat": subprocess.run(
            [sys.executable, "-m", "homering", "chat", "--broker", broker],
            input="Hi!\n/quit\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        ),
        "agent": subprocess.run(
            [sys.executable, "-m", "homering", "agent", "--broker", broker, "--name", "keyless", "--threads", "1"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        ),
    }
    for what, proc in runs.items():
        assert proc.returncode != 0, what
        errors = [line for line in proc.stderr.splitlines() if line.startswith("homering: error:")]
        assert len(errors) == 1 and "cluster key" in errors[0] and "--key-file" in errors[0], (what, proc.stderr)
        assert "Traceback" not in proc.stderr, what
    keyed_cluster.check()  # the cluster itself is unharmed


def test_keyed_cluster_ignores_forged_streams_statuses_and_profiles(keyed_cluster, smollm2_ref):
    """The MQTT attacks of the hardening issue, by a client on the broker without the key: forged stream events
    (done, error, token, interrupted) and replayed genuine ones, a forged offline status of the head, another
    agent's genuine status replayed on the head's topic, a fake retained profile. The answer in flight is the
    right one, nobody re-plans and the fake agent is never planned."""
    from homering.wire import AgentProfile, AgentStatus, StreamEvent

    cluster, key = keyed_cluster, keyed_cluster.key

    async def go():
        async with ClusterClient(cluster.broker, key=key) as client:
            await client.wait_ready()
            plan = client.plan
            head, other = plan.head.name, next((a.name for a in plan.ring if a.name != plan.head.name), None)
            async with aiomqtt.Client(cluster.broker.host, cluster.broker.port) as bad:
                await bad.subscribe(Topics.generate(head), qos=1)
                await bad.subscribe(Topics.ALL_STATUS, qos=1)
                await bad.subscribe(f"{Topics.stream('')}+", qos=1)
                genuine_statuses = {
                    m.topic.value: m.payload for m in await _drain(bad, 1.0) if m.topic.matches(Topics.ALL_STATUS)
                }
                request = chat_request("Write a haiku about the sea.")
                asking = asyncio.create_task(ask(client, request))
                stream = Topics.stream(request.request_id)
                recorded = []
                async with asyncio.timeout(60):
                    async for m in bad.messages:  # wait for the answer to start, recording what the head sends
                        if m.topic.value == stream:
                            recorded.append(m.payload)
                            break
                for event in (
                    StreamEvent(
                        request_id=request.request_id,
                        type="done",
                        text="HACKED-BY-MQTT",
                        token_ids=[1],
                        prompt_token_ids=[1],
                        finish_reason="stop",
                        index=1,
                    ),
                    StreamEvent(request_id=request.request_id, type="error", error="forged", index=1),
                    StreamEvent(request_id=request.request_id, type="token", text="HACKED", index=1),
                    StreamEvent(request_id=request.request_id, type="interrupted", index=1),
                ):
                    await bad.publish(stream, event.dump(), qos=1)
                for payload in recorded:  # a genuine signed event, again
                    await bad.publish(stream, payload, qos=1)
                await bad.publish(Topics.status(head), AgentStatus(state="offline").dump(), qos=1)
                if other is not None:
                    await bad.publish(Topics.status(head), genuine_statuses[Topics.status(other)], qos=1)
                fake = AgentProfile(
                    name="evil",
                    host="127.0.0.1",
                    data_port=9,
                    pid=1,
                    os="linux",
                    cpu_count=64,
                    threads=64,
                    ram_total=1 << 40,
                    ram_available=1 << 40,
                )
                await bad.publish(Topics.profile("evil"), fake.dump(), qos=1, retain=True)
                await bad.publish(Topics.status("evil"), AgentStatus(state="online").dump(), qos=1, retain=True)
                try:
                    answer = await asyncio.wait_for(asking, 120)
                    await asyncio.sleep(3)  # time for a re-plan, if the controller were fooled
                    after = await ask(client, chat_request("List three prime numbers."))
                finally:
                    for topic in (Topics.profile("evil"), Topics.status("evil")):
                        await bad.publish(topic, b"", qos=1, retain=True)
            return plan, client.plan, client.status, answer, after

    plan, now, status, answer, after = run(go())
    for a in (answer, after):
        smollm2_ref.check_answer(a.prompt_token_ids, a.token_ids, a.finish_reason, 24)
        assert "HACKED" not in a.text
    assert now.plan_id == plan.plan_id and status.state == "ready"  # no re-plan
    assert all(a.name != "evil" for a in now.ring) and "evil" not in now.dropped
    cluster.check()
    log = cluster.log_path.read_text()
    assert "unsigned StreamEvent" in log and "StreamEvent refused: replayed" in log
    assert "unsigned AgentStatus" in log and "unsigned AgentProfile" in log
    assert "on the topic of" in log  # another agent's status, replayed on the head's topic
    assert "Traceback" not in log


def test_newest_state_keeps_the_newest_per_agent_on_its_own_topic_and_each_session_s_will_once():
    """NewestState, on messages signed at given times: replays of older state, another agent's state on this
    topic, and an old process's will are refused; the current process's will (signed before its statuses)
    counts once; unsigned messages (no key) all pass."""
    from homering.wire import AgentStatus, MalformedMessage
    from homering.wire.security import NewestState

    def signed(at: int, **fields) -> AgentStatus:
        msg = AgentStatus(**fields)
        msg._signed_at = at
        return msg

    topic = Topics.status("a")
    order = NewestState()
    will = signed(100, name="a", session="51", state="offline")  # signed when process 51 connected
    assert order.check(topic, signed(200, name="a", session="51", state="ready")).state == "ready"
    for refused in (
        signed(150, name="a", session="51", state="ready"),  # an older status, replayed
        signed(300, name="b", session="52", state="offline"),  # b's, on a's topic
        signed(90, name="a", session="40", state="offline"),
    ):  # an earlier process's will
        with pytest.raises(MalformedMessage):
            order.check(topic, refused)
    assert order.check(topic, will) is will  # 51's will: it lost the broker
    with pytest.raises(MalformedMessage):
        order.check(topic, will)  # the same will again
    assert order.check(topic, signed(400, name="a", session="60", state="online")).session == "60"
    unsigned = AgentStatus(state="offline")
    assert order.check(topic, unsigned) is unsigned

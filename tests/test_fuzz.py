"""Fuzzing the wire (hypothesis): every message parser, the frame parser, the link handshake, and the MQTT
handlers of an agent and the controller — in process, and through a real broker into a running cluster."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from types import SimpleNamespace

import aiomqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homering.agent.agent import Agent
from homering.client.chat import ask
from homering.client.client import ClusterClient, new_request_id
from homering.controller.controller import Controller
from homering.transport.links import recv_group
from homering.transport.mqtt import BrokerURL
from homering.wire import (
    HEADER,
    ChatMessage,
    FrameError,
    FrameHeader,
    GenerateRequest,
    HandshakeError,
    MalformedMessage,
    Message,
    Sampling,
    Topics,
)
from homering.wire.base import MESSAGE_MAC_LABEL
from homering.wire.handshake import (
    HEALTH_MAGIC,
    LINK_HELLO,
    LINK_REPLY,
    HealthProbed,
    client_handshake,
    server_handshake,
)
from homering.wire.security import ClusterKey

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
KEY = ClusterKey("f" * 32, source="fuzz")


def _message_classes() -> list[type[Message]]:
    out, todo = [], [Message]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out.append(sub)
            todo.append(sub)
    return sorted(set(out), key=lambda c: c.__name__)


CLASSES = _message_classes()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from([2**63, -(2**63) - 1, 10**400, 1e308, "ready", "x" * 65]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _dumps(value) -> bytes:
    try:
        return json.dumps(value, allow_nan=True).encode()
    except (ValueError, OverflowError):  # an integer too long for the JSON module
        return b"0"


def _samples() -> dict[str, dict]:
    """A valid message of the classes handlers act on (mutated one field at a time by :func:`payloads_for`)."""
    from homering.wire import (
        AgentProfile,
        AgentStats,
        AgentStatus,
        CancelJob,
        ControllerStatus,
        GenerateJob,
        LinkReport,
        Plan,
        PlanAgent,
        StreamEvent,
        WindowAssignment,
    )

    plan = Plan(
        plan_id="p1",
        model_path="/nonexistent.gguf",
        model_fingerprint="f",
        n_layers=2,
        n_ctx=64,
        planner="proportional",
        ring=[PlanAgent(name="fuzz", host="127.0.0.1", data_port=9, windows=[WindowAssignment(start=0, end=2)])],
    )
    msgs = [
        plan,
        ControllerStatus(state="ready", plan_id="p1", model_path="/nonexistent.gguf", model_fingerprint="f"),
        GenerateJob(request_id="r1", plan_id="p1", prompt_token_ids=[1, 2], sampling=Sampling()),
        CancelJob(request_id="r1"),
        GenerateRequest(request_id="r1", prompt="hi"),
        GenerateRequest(request_id="r2", prompt_token_ids=[1, 2, 3]),
        AgentProfile(
            name="a1",
            host="127.0.0.1",
            data_port=9,
            pid=1,
            os="linux",
            cpu_count=1,
            threads=1,
            ram_total=1,
            ram_available=1,
        ),
        AgentStatus(state="ready", plan_id="p1"),
        AgentStats(name="a1"),
        LinkReport(probe_id="x"),
        StreamEvent(request_id="r1", type="done", token_ids=[1]),
    ]
    return {type(m).__name__: json.loads(m.model_dump_json()) for m in msgs}


SAMPLES = _samples()


@st.composite
def payloads_for(draw, cls: type[Message]) -> bytes:
    """Random bytes, random JSON, the class's own fields with random (often wrong) values, versions and
    huge numbers, sometimes with a random or truncated signature trailer, or a valid message with one field
    replaced or dropped."""
    kind = draw(st.sampled_from([0, 1, 2, 3, 4, 4, 5, 6, 6] if cls.__name__ in SAMPLES else [0, 1, 2, 3]))
    if kind >= 4:
        obj = dict(SAMPLES[cls.__name__])
        field = draw(st.sampled_from(sorted(obj)))
        if kind == 4:
            obj[field] = draw(json_values | st.integers() | st.lists(st.integers(), max_size=5))
        elif kind == 5:
            obj.pop(field)
        return _dumps(obj)  # kind 6: the valid message itself, so handlers get past parsing
    if kind == 0:
        raw = draw(st.binary(max_size=200))
    elif kind == 1:
        raw = _dumps(draw(json_values))
    else:
        fields = list(cls.model_fields)
        obj = draw(
            st.dictionaries(
                st.sampled_from(fields + ["version", "_auth", "extra"]), json_values, max_size=len(fields) + 1
            )
        )
        raw = _dumps(obj)
        if kind == 3 and raw.endswith(b"}"):
            trailer = draw(
                st.sampled_from(
                    [
                        b',"_auth":{"ts":1,"nonce":"' + b"0" * 32 + b'","mac":"' + b"0" * 64 + b'"}}',
                        b',"_auth":{"ts":99999999999999999,"nonce":"' + b"a" * 32 + b'","mac":"' + b"f" * 64 + b'"}}',
                        b',"_auth":{"ts":1,"nonce":"zz","mac":""}}',
                        b',"_auth":{}}',
                        b',"_auth"',
                    ]
                )
            )
            raw = raw[:-1] + trailer
    return raw


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_message_parser_raises_only_malformed_message(cls):
    @FAST
    @given(payloads_for(cls), st.booleans(), st.booleans())
    def check(raw, keyed, as_text):
        payload = raw.decode(errors="surrogateescape") if as_text else raw
        try:
            cls.load(payload, key=KEY if keyed else None)
        except MalformedMessage:
            pass

    check()


def test_messages_reject_non_finite_numbers():
    from homering.wire import LinkReport

    for text in (b'{"probe_id":"a","link_ms":NaN}', b'{"probe_id":"a","link_mbps":Infinity}'):
        with pytest.raises(MalformedMessage):
            LinkReport.load(text, key=None)


# ------------------------------------------------------------------ frames and the handshake
header_fields = st.tuples(
    st.sampled_from([b"HRNG", b"HRNG", b"XXXX"]),
    st.integers(0, 3),
    st.integers(0, 7),
    st.integers(0, 7),
    st.integers(0, 3),
    st.integers(0, 2**32 - 1),
    st.integers(0, 300) | st.integers(0, 2**32 - 1),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2) | st.integers(0, 2**16 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 70000) | st.integers(0, 4),
    st.integers(0, 40000) | st.integers(0, 8),
    st.integers(0, 2**32 - 1) | st.integers(0, 256),
)


@FAST
@given(st.binary(min_size=HEADER.size, max_size=HEADER.size) | header_fields.map(lambda f: HEADER.pack(*f)))
def test_frame_header_parser_raises_only_frame_error(raw):
    try:
        h = FrameHeader.unpack(raw)
    except FrameError:
        return
    assert h.payload_len <= 256 << 20 and FrameHeader.unpack(h.pack()) == h


@FAST
@given(
    st.lists(st.binary(max_size=64) | header_fields.map(lambda f: HEADER.pack(*f)), max_size=6), st.binary(max_size=600)
)
def test_frame_reader_raises_only_frame_error_or_ends(chunks, tail):
    """Whatever arrives on a link, recv_group returns groups, None at the end, or raises FrameError
    (ConnectionError only when the stream ends inside a frame)."""
    a, b = socket.socketpair()
    data = b"".join(chunks) + tail
    a.sendall(data)
    a.shutdown(socket.SHUT_WR)
    b.settimeout(5)
    try:
        for _ in range(len(data) + 1):
            if recv_group(b) is None:
                break
    except FrameError:
        pass
    except ConnectionError as exc:
        assert "mid-" in str(exc)
    finally:
        a.close()
        b.close()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=LINK_REPLY.size + 8), st.booleans(), st.booleans())
def test_handshake_raises_only_handshake_error(raw, keyed, server_side):
    """Random bytes in place of the peer's handshake: a clean HandshakeError, never a hang or another error;
    on the server side, bytes that begin with the health probe's magic are a probe (HealthProbed, answered)."""
    key = KEY if keyed else None
    a, b = socket.socketpair()
    try:
        if server_side:
            b.sendall(raw)
            b.shutdown(socket.SHUT_WR)
            with pytest.raises(HealthProbed if raw.startswith(HEALTH_MAGIC) else HandshakeError):
                server_handshake(a, key, timeout=2)
        else:
            b.sendall(raw[: LINK_HELLO.size] if len(raw) >= LINK_HELLO.size else raw)
            b.shutdown(socket.SHUT_WR)
            with pytest.raises(HandshakeError):
                client_handshake(a, key, timeout=2)
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------ MQTT handlers, in process
def _signed_body(cls_name: str, body: bytes) -> bytes:
    """``body`` (a JSON object) signed with :data:`KEY` as message type ``cls_name``: passes the signature
    check, so the fuzz reaches the parser and handler behind it."""
    import time

    ts, nonce = str(int(time.time() * 1000)).encode(), os.urandom(16).hex().encode()
    tag = KEY.mac(MESSAGE_MAC_LABEL, cls_name.encode(), ts, nonce, body).hex().encode()
    return (
        body[:-1]
        + (b"," if body != b"{}" else b"")
        + b'"_auth":{"ts":'
        + ts
        + b',"nonce":"'
        + nonce
        + b'","mac":"'
        + tag
        + b'"}}'
    )


AGENT_TOPICS = [
    (Topics.PLAN, "Plan"),
    (Topics.CONTROLLER, "ControllerStatus"),
    (Topics.generate("fuzz"), "GenerateJob"),
    (Topics.probe("fuzz"), "LinkProbe"),
    (Topics.cancel("fuzz"), "CancelJob"),
]  # LinkProbe has no valid sample: a probe measures for seconds
CONTROLLER_TOPICS = [
    (Topics.profile("a1"), "AgentProfile"),
    (Topics.status("a1"), "AgentStatus"),
    (Topics.REQUESTS, "GenerateRequest"),
    (Topics.probe_result("a1"), "LinkReport"),
    (Topics.stream("r1"), "StreamEvent"),
    (Topics.stats("a1"), "AgentStats"),
]
BY_NAME = {c.__name__: c for c in CLASSES}


@st.composite
def handler_input(draw, topics):
    topic, cls_name = draw(st.sampled_from(topics))
    raw = draw(payloads_for(BY_NAME[cls_name]))
    if draw(st.booleans()) and raw.startswith(b"{") and raw.endswith(b"}"):
        try:
            json.loads(raw)
            raw = _signed_body(cls_name, raw)
        except ValueError:
            pass
    return topic, raw


class _Recorder:
    """Stands in for the MQTT client of a bus fed by hand (``Bus.attach``): records what is published."""

    def __init__(self):
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic, payload, **kw):
        self.published.append((topic, payload))


class _Failures(logging.Handler):
    """The failures a process logs: a handler that raised (the bus), a background task that raised
    (``Tasks``), a task whose exception nobody retrieved (asyncio)."""

    WATCHED = ("homering.bus", "homering.tasks", "asyncio")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.setFormatter(logging.Formatter("%(name)s: %(message)s"))  # and the traceback
        self.seen: list[str] = []

    def emit(self, record):
        self.seen.append(self.format(record))

    def __enter__(self):
        for name in self.WATCHED:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in self.WATCHED:
            logging.getLogger(name).removeHandler(self)


def _feed(process, messages) -> list[str]:
    """Dispatch ``messages`` on ``process``'s bus (no broker), let the handlers' tasks run a moment; the
    failures logged meanwhile (tasks still running at the end are cancelled, as when a process stops)."""
    process.bus.attach(_Recorder())

    async def go():
        for topic, raw in messages:
            process.bus.dispatch(topic, raw)
        await asyncio.sleep(0.05)

    with _Failures() as failures:
        asyncio.run(go())
    return failures.seen


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(handler_input(AGENT_TOPICS), min_size=1, max_size=5), st.booleans())
def test_an_agent_logs_and_drops_whatever_arrives(messages, keyed):
    agent = Agent(BrokerURL("127.0.0.1", 1), name="fuzz", threads=1, key=KEY if keyed else None)
    assert _feed(agent, messages) == []


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from homering.engine.tokenizer import Tokenizer

    return Tokenizer(smollm2)


def test_the_controller_logs_and_drops_whatever_arrives(smollm2, tokenizer):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(handler_input(CONTROLLER_TOPICS), min_size=1, max_size=5), st.booleans())
    def check(messages, keyed):
        controller = Controller(BrokerURL("127.0.0.1", 1), smollm2, n_agents=1, key=KEY if keyed else None)
        controller.requests.tokenizer = tokenizer
        assert _feed(controller, messages) == []

    check()


# ------------------------------------------------------------------ through a real broker
def test_a_running_cluster_survives_random_payloads_on_every_topic(keyed_cluster, smollm2_ref):
    """Random (and validly signed random) payloads published on every topic the agents, the controller and
    clients subscribe to; then a real request still gets the reference model's tokens."""
    cluster = keyed_cluster
    names = ["agent-0", "agent-1", "agent-2", "stranger"]
    topics = [(Topics.PLAN, "Plan"), (Topics.CONTROLLER, "ControllerStatus"), (Topics.REQUESTS, "GenerateRequest")]
    for n in names:
        topics += [
            (Topics.generate(n), "GenerateJob"),
            (Topics.probe(n), "LinkProbe"),
            (Topics.cancel(n), "CancelJob"),
            (Topics.profile(n), "AgentProfile"),
            (Topics.status(n), "AgentStatus"),
            (Topics.stats(n), "AgentStats"),
            (Topics.probe_result(n), "LinkReport"),
        ]
    topics.append((Topics.stream("fuzzed"), "StreamEvent"))
    collected: list[tuple[str, bytes]] = []

    def sign_with_cluster_key(cls_name: str, raw: bytes) -> bytes:
        import time

        ts, nonce = str(int(time.time() * 1000)).encode(), os.urandom(16).hex().encode()
        tag = cluster.key.mac(MESSAGE_MAC_LABEL, cls_name.encode(), ts, nonce, raw).hex().encode()
        return raw[:-1] + b',"_auth":{"ts":' + ts + b',"nonce":"' + nonce + b'","mac":"' + tag + b'"}}'

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(topics), st.data())
    def collect(topic_cls, data):
        topic, cls_name = topic_cls
        raw = data.draw(payloads_for(BY_NAME[cls_name]))
        if raw.startswith(b"{") and raw.endswith(b"}") and len(raw) > 2 and data.draw(st.booleans()):
            try:
                BY_NAME[cls_name].model_validate_json(raw)
            except ValueError:  # signed garbage gets past the signature check into the parser
                raw = sign_with_cluster_key(cls_name, raw)
            # a valid order signed with the key is no fuzz but an order: it stays unsigned (and dropped)
        collected.append((topic, raw))

    collect()

    async def go():
        async with ClusterClient(cluster.broker, key=cluster.key) as client:
            await client.wait_ready()
            plan_id = client.plan.plan_id
            async with aiomqtt.Client(cluster.broker.host, cluster.broker.port) as fuzzer:
                for topic, raw in collected:
                    await fuzzer.publish(topic, raw, qos=1)  # never retained: the broker keeps no garbage
            await asyncio.sleep(1.0)
            await client.wait_ready()
            answer = await ask(
                client,
                GenerateRequest(
                    request_id=new_request_id(),
                    sampling=Sampling(max_tokens=24, temperature=0),
                    messages=[ChatMessage(role="user", content="Name a colour.")],
                ),
            )
            return answer, plan_id, client.plan.plan_id

    answer, before, after = asyncio.run(asyncio.wait_for(go(), 180))
    assert len(collected) == 250
    smollm2_ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, 24)
    assert before == after  # nothing fuzzed made the controller re-plan
    cluster.check()
    log = cluster.log_path.read_text()
    assert "Traceback" not in log and "Task exception" not in log
    assert log.count("dropped malformed message") >= 100


def test_an_unexpected_failure_in_a_request_still_ends_its_stream_with_an_error():
    """A bug on the head (here a TypeError, as llama.cpp's 5-argument penalties sampler once raised) ends
    the request with an error event and frees its sequence, so the controller does not wait forever."""
    from homering.agent.generation import Generator
    from homering.agent.telemetry import StreamHistory
    from homering.tasks import Tasks
    from homering.wire import GenerateJob, Sampling

    class HeadRing:  # what the generator asks of the loaded plan: this agent heads plan "p"
        is_head = True
        plan = SimpleNamespace(plan_id="p")

        def __init__(self):
            self.released = []

        def claim(self, request_id, seq_id):
            return (request_id, seq_id)

        def release(self, slot):
            self.released.append(slot)

    def broken(ring, slot, job, emit):
        raise TypeError("llama_sampler_init_penalties() takes 5 arguments")

    published = []

    async def publish(topic, msg, *, qos=1, retain=False):
        published.append(msg)
        return True

    ring = HeadRing()
    job = GenerateJob(request_id="r-bug", plan_id="p", seq_id=0, prompt_token_ids=[1], sampling=Sampling())

    async def go():
        tasks = Tasks("test")
        generator = Generator("bug", lambda: ring, StreamHistory(publish, tasks), tasks, session=broken)
        try:
            await generator.serve(job)
        finally:
            generator.close()

    asyncio.run(go())
    assert [e.type for e in published] == ["error"] and "TypeError" in published[0].error
    assert ring.released == [("r-bug", 0)]

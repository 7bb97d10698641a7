"""End to end: a real mosquitto, a controller and agent processes over real sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys

import aiomqtt
import pytest

from homering.client.chat import ask
from homering.client.client import ClusterClient, new_request_id
from homering.client.local import LocalCluster
from homering.errors import HomeringError
from homering.transport.mqtt import BrokerURL
from homering.wire import ChatMessage, ControllerStatus, GenerateRequest, Sampling, Topics
from tests.conftest import run_mosquitto

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
GREEDY = Sampling(max_tokens=32, temperature=0)


def chat_request(text: str, sampling: Sampling = GREEDY) -> GenerateRequest:
    return GenerateRequest(
        request_id=new_request_id(), messages=[ChatMessage(role="user", content=text)], sampling=sampling
    )


@pytest.fixture(scope="module")
def cluster(smollm2, mosquitto, tmp_path_factory):
    """3 agents + a controller on mosquitto, context 256 tokens; children's logs in a file.

    The proportional planner spreads the layers over every agent (Halda would
    keep them all on one, as hops on one machine only cost time).
    """
    log_path = tmp_path_factory.mktemp("logs") / "cluster.log"
    with (
        open(log_path, "w") as log_file,
        LocalCluster(
            smollm2, n_agents=3, broker=mosquitto, threads=1, n_ctx=256, planner="proportional", log_file=log_file
        ) as c,
    ):
        c.log_path = log_path
        yield c


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 180))


def test_three_agents_match_unsplit_model(cluster, smollm2_ref):
    async def go():
        async with ClusterClient(cluster.broker) as client:
            await client.wait_ready()
            assert len(client.plan.ring) == 3
            covered = [(w.start, w.end) for a in client.plan.ring for w in a.windows]
            assert covered[0][0] == 0 and covered[-1][1] == 30
            assert all(x[1] == y[0] for x, y in zip(covered, covered[1:]))
            return [await ask(client, chat_request(p)) for p in PROMPTS]

    answers = run(go())
    for answer in answers:
        assert answer.prompt_token_ids and answer.token_ids
        smollm2_ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, 32)


def test_prompt_longer_than_context_is_refused_and_cluster_keeps_serving(cluster, smollm2_ref):
    async def go():
        async with ClusterClient(cluster.broker) as client:
            await client.wait_ready()
            events = [e async for e in client.generate(chat_request("tell me a story " * 200))]
            after = await ask(client, chat_request(PROMPTS[0]))
            return events, after

    events, after = run(go())
    assert [e.type for e in events] == ["error"]
    assert "context" in events[0].error and "256" in events[0].error
    smollm2_ref.check_answer(after.prompt_token_ids, after.token_ids, after.finish_reason, 32)


def test_prompt_token_ids_are_served_and_checked(cluster, smollm2_ref):
    """A request may carry token ids instead of text; ids outside the vocabulary get an error reply."""

    async def go():
        async with ClusterClient(cluster.broker) as client:
            await client.wait_ready()
            by_text = await ask(client, chat_request(PROMPTS[1]))
            by_ids = await ask(
                client,
                GenerateRequest(
                    request_id=new_request_id(), sampling=GREEDY, prompt_token_ids=by_text.prompt_token_ids
                ),
            )
            bad = [
                e
                async for e in client.generate(
                    GenerateRequest(request_id=new_request_id(), sampling=GREEDY, prompt_token_ids=[1, 2, 49152])
                )
            ]
            both = [
                e
                async for e in client.generate(
                    GenerateRequest(request_id=new_request_id(), sampling=GREEDY, prompt="hi", prompt_token_ids=[1, 2])
                )
            ]
            return by_text, by_ids, bad, both

    by_text, by_ids, bad, both = run(go())
    assert by_ids.prompt_token_ids == by_text.prompt_token_ids and by_ids.token_ids == by_text.token_ids
    smollm2_ref.check_answer(by_ids.prompt_token_ids, by_ids.token_ids, by_ids.finish_reason, 32)
    assert [e.type for e in bad] == ["error"] and "49152" in bad[0].error and "vocabulary" in bad[0].error
    assert [e.type for e in both] == ["error"] and "exactly one" in both[0].error


def test_malformed_messages_and_frames_are_dropped(cluster, smollm2_ref):
    async def go():
        async with ClusterClient(cluster.broker) as client:
            await client.wait_ready()
            plan = client.plan
            async with aiomqtt.Client(cluster.broker.host, cluster.broker.port) as bad:
                for name in (a.name for a in plan.ring):
                    await bad.publish(Topics.generate(name), b"\xff not json", qos=1)
                    await bad.publish(Topics.generate(name), json.dumps({"request_id": 5}), qos=1)
                await bad.publish(Topics.PLAN, b'{"plan_id": []}', qos=1)
                await bad.publish(Topics.REQUESTS, b"[1, 2, 3]", qos=1)
            # garbage on a data port: the agent drops that link and keeps its ring
            target = plan.ring[1]
            with socket.create_connection((target.host, target.data_port)) as s:
                s.sendall(b"GARBAGE!" * 20)
            await asyncio.sleep(0.5)
            return await ask(client, chat_request(PROMPTS[1]))

    answer = run(go())
    smollm2_ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, 32)
    cluster.check()  # nobody died
    log = cluster.log_path.read_text()
    assert log.count("dropped malformed message") >= 7
    assert "dropping data link" in log


def test_agents_joining_and_leaving_trigger_a_replan_between_requests(cluster, smollm2_ref):
    """A fourth agent joins: the next request runs on a 4-agent ring; it leaves: back to 3.

    The reference checks run outside the client's event loop: a check blocks it (llama.cpp decoding 96 tokens
    took 18 s on a loaded machine), and the broker then drops the client for its missed keepalive. The late
    agent's output goes to the cluster log.
    """

    async def go():
        async with ClusterClient(cluster.broker) as client:
            await client.wait_ready()
            first = client.plan.plan_id
            extra = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "homering",
                    "agent",
                    "--broker",
                    str(cluster.broker),
                    "--name",
                    "late-agent",
                    "--threads",
                    "1",
                ],
                stdin=subprocess.DEVNULL,
                stdout=cluster.log_file,
                stderr=cluster.log_file,
            )
            try:
                # a request in flight while the agent joins keeps its ring to the end
                seen: set[str] = set()
                during = await ask(
                    client,
                    chat_request("Tell me a long story about a lighthouse.", Sampling(max_tokens=96, temperature=0)),
                    on_text=lambda _: seen.add(client.plan.plan_id),
                )
                assert seen == {first}
                await client.wait_ready(120, until=lambda p: p.position("late-agent") is not None)
                grown = client.plan
                a4 = await ask(client, chat_request(PROMPTS[2]))
            finally:
                extra.terminate()
                await asyncio.to_thread(extra.wait, 30)
            await client.wait_ready(120, until=lambda p: p.position("late-agent") is None)
            a3 = await ask(client, chat_request(PROMPTS[2]))
            return first, during, grown, client.plan, a4, a3

    first, during, grown, shrunk, a4, a3 = run(go())
    assert len(grown.ring) == 4 and grown.plan_id != first
    assert len(shrunk.ring) == 3 and shrunk.plan_id != grown.plan_id
    smollm2_ref.check_answer(during.prompt_token_ids, during.token_ids, during.finish_reason, 96)
    for answer in (a4, a3):
        smollm2_ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, 32)


def test_client_reports_the_controllers_detail_and_a_lost_connection(tmp_path):
    """A client says what the controller waits for when it gives up; one whose broker connection broke (e.g.
    dropped for a missed keepalive while its event loop was blocked) says so at once instead of waiting out
    its timeout on the last status it saw."""
    status = ControllerStatus(state="planning", plan_id="p2", detail="waiting for late-agent to load plan p2")

    async def go(broker):
        async with aiomqtt.Client(broker.host, broker.port) as controller:
            await controller.publish(Topics.CONTROLLER, status.dump(), qos=1, retain=True)
        async with ClusterClient(broker) as client:
            with pytest.raises(HomeringError, match=r"\(planning: waiting for late-agent to load plan p2\)"):
                await client.wait_ready(1)
            # a client with the same id takes the session over: the broker drops the first connection
            async with aiomqtt.Client(broker.host, broker.port, identifier=client.identifier):
                with pytest.raises(HomeringError, match="lost the connection to the MQTT broker") as lost:
                    await client.wait_ready(600)
                assert "planning, waiting for late-agent to load plan p2" in str(lost.value)
                with pytest.raises(HomeringError, match="lost the connection to the MQTT broker"):
                    [e async for e in client.generate(chat_request(PROMPTS[0]))]

    with run_mosquitto(tmp_path) as broker:
        run(go(broker))


def test_a_loading_plan_names_the_agents_it_waits_for(smollm2):
    """While a plan loads, the controller's status detail names the agents of its ring not ready with it."""
    from homering.controller.controller import Controller
    from homering.wire import AgentStatus, Plan, PlanAgent

    c = Controller(BrokerURL("127.0.0.1", 1), smollm2, n_agents=1)
    plan = Plan.model_construct(plan_id="p2", ring=[PlanAgent.model_construct(name=n) for n in ("a", "late", "b")])
    status = c.membership.on_status  # the agents' statuses, as the bus hands them over
    status("a", AgentStatus(state="ready", plan_id="p2"), retained=False)
    status("b", AgentStatus(state="ready", plan_id="p1"), retained=False)
    assert c.loader.loading_detail(plan) == "waiting for late, b to load plan p2"
    status("late", AgentStatus(state="loading", plan_id="p2"), retained=False)
    status("b", AgentStatus(state="ready", plan_id="p2"), retained=False)
    assert c.loader.loading_detail(plan) == "waiting for late to load plan p2"
    status("late", AgentStatus(state="ready", plan_id="p2"), retained=False)
    assert c.loader.loading_detail(plan) == "plan p2 loaded"


def test_up_plans_from_measured_profiles(smollm2, smollm2_ref):
    """`homering up` with Halda: the plan comes from the agents' measured profiles and predicts ms/token."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "homering",
            "up",
            "--agents",
            "3",
            "--model",
            str(smollm2),
            "--threads",
            "1",
            "--prompt",
            "Name a colour.",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {
        "text",
        "prompt_token_ids",
        "token_ids",
        "ttft_ms",
        "ms_per_token",
        "plan",
        "predicted_ms_per_token",
    }
    plan = out["plan"]
    assert plan["planner"] == "halda" and plan["k"] == 1
    assert out["predicted_ms_per_token"] == plan["predicted_ms_per_token"] > 0
    assert sorted([a["name"] for a in plan["ring"]] + plan["dropped"]) == ["agent-0", "agent-1", "agent-2"]
    predicted = sum(sum(a["predicted"].values()) for a in plan["ring"])
    assert predicted == pytest.approx(plan["predicted_ms_per_token"])  # the breakdown adds up
    assert all(a["mode"] == "resident" for a in plan["ring"])  # SmolLM2 fits in RAM
    smollm2_ref.check_answer(out["prompt_token_ids"], out["token_ids"], out["finish_reason"], 24)
    assert out["text"].strip()

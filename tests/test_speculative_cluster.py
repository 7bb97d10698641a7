"""Speculative decoding end to end: greedy answers with ``--draft ngram`` and ``--draft MODEL`` are the
unsplit target's, over 3 agents with k = 1 and k = 2, with 2 concurrent requests, and after an agent is
killed mid-answer. Real mosquitto, real agent processes, real llama.cpp.

A module of its own: one broker carries one cluster at a time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest

from homering.client.chat import ask
from homering.client.local import LocalCluster, stop_processes
from homering.transport.broker import free_port
from homering.wire import Sampling
from tests.conftest import wait_healthy
from tests.test_cluster import chat_request, run
from tests.test_faults import _homering, _stream, _wait_plan

PROMPTS = [
    "Repeat this line three times: the quick brown fox jumps over the lazy dog.",
    'Return this JSON with the name changed to Bob: {"name": "Alice", "age": 30, "city": "Paris"}',
]
MAX_NEW = 40
GREEDY = Sampling(max_tokens=MAX_NEW, temperature=0)


@pytest.mark.parametrize(
    "target,rounds,draft",
    [
        ("smollm2", 1, "ngram"),
        ("smollm2", 2, "ngram"),
        ("gemma", 1, "ngram"),
        ("gemma", 2, "ngram"),
        ("smollm2_f16", 1, "smollm2"),
        ("smollm2_f16", 2, "smollm2"),
    ],
)
def test_speculative_answers_are_the_unsplit_targets(target, rounds, draft, mosquitto, request, tmp_path):
    """2 prompts one after the other, then both at once: the target's greedy tokens; drafts were verified,
    some kept and some rejected (both paths ran)."""
    path, ref = request.getfixturevalue(target), request.getfixturevalue(f"{target}_ref")
    spec = draft if draft == "ngram" else str(request.getfixturevalue(draft))
    with (
        open(tmp_path / "cluster.log", "w") as log_file,
        LocalCluster(
            path,
            n_agents=3,
            broker=mosquitto,
            threads=1,
            n_ctx=256,
            planner="proportional",
            rounds=rounds,
            log_file=log_file,
            # every trip drafts 2 or more: the timed γ may choose plain trips on a busy machine, and both paths
            # (kept and rejected drafts) must run
            controller_args=("--draft", spec, "--draft-min", "2"),
        ) as cluster,
    ):
        from homering.client.client import ClusterClient

        async def go():
            async with ClusterClient(cluster.broker) as client:
                await client.wait_ready()
                one = [await ask(client, chat_request(p, GREEDY)) for p in PROMPTS]
                two = await asyncio.gather(*(ask(client, chat_request(p, GREEDY)) for p in PROMPTS))
                return client.plan, [*one, *two]

        plan, answers = run(go())
    assert plan.k == rounds and len(plan.ring) == 3
    for i, a in enumerate(answers):
        try:
            ref.check_answer(a.prompt_token_ids, a.token_ids, a.finish_reason, MAX_NEW)
        except AssertionError:
            want, _ = ref.greedy(a.prompt_token_ids, MAX_NEW)
            pytest.fail(f"answer {i} ({'alone' if i < 2 else 'concurrent'}): {a.token_ids} != {want}")
    drafted, accepted = sum(a.drafted or 0 for a in answers), sum(a.accepted or 0 for a in answers)
    assert 0 < accepted < drafted, (drafted, accepted)
    if draft == "ngram" and rounds == 1:  # trips sent ahead while alone on the ring: some kept, some stale
        found = re.findall(r"trips sent ahead: (\d+), (\d+) of them", (tmp_path / "cluster.log").read_text())
        sent, kept = (sum(int(f[i]) for f in found) for i in (0, 1))
        assert 0 < kept < sent, (sent, kept)


def test_an_agents_own_draft_model(smollm2_f16, smollm2_f16_ref, smollm2, mosquitto, tmp_path):
    """`homering agent --draft MODEL`: the head drafts with its own draft model when the controller names
    none; the answer is the target's."""
    with (
        open(tmp_path / "cluster.log", "w") as log_file,
        LocalCluster(
            smollm2_f16,
            n_agents=2,
            broker=mosquitto,
            threads=1,
            n_ctx=256,
            planner="proportional",
            log_file=log_file,
            agent_args=("--draft", str(smollm2), "--draft-max", "4"),
        ) as cluster,
    ):
        from homering.client.client import ClusterClient

        async def go():
            async with ClusterClient(cluster.broker) as client:
                await client.wait_ready()
                return await ask(client, chat_request(PROMPTS[0], GREEDY))

        answer = run(go())
    smollm2_f16_ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, MAX_NEW)
    assert answer.drafted and 0 < answer.accepted <= answer.drafted
    assert answer.drafted <= 4 * answer.trips  # --draft-max 4


@pytest.fixture(scope="module")
def up_ngram(smollm2, mosquitto, tmp_path_factory):
    """`homering up --agents 3 --draft ngram --draft-min 1` with the API, a ring of 3: every trip drafts (the
    adaptive γ, timed on a busy machine, could otherwise choose γ = 0 and leave the drafted path untested)."""
    port = free_port()
    with open(tmp_path_factory.mktemp("up") / "up.log", "w") as log:
        proc = _homering(
            *("up", "--agents", "3", "--model", str(smollm2), "--broker", str(mosquitto), "--threads", "1"),
            *("--ctx", "512", "--planner", "proportional", "--api-port", str(port), "--no-chat"),
            *("--draft", "ngram", "--draft-min", "1"),
            log=log,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, [proc])
            yield base
        finally:
            stop_processes([proc], 30)


PROMPT = "Repeat after me, five times: one two three four five six seven eight nine ten."


def _complete(base: str, **extra) -> dict:
    body = {"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": PROMPT, "max_tokens": 64, "temperature": 0, **extra}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return r.json()


def test_stop_strings_max_tokens_and_the_api_field(up_ngram):
    """Per request: drafting off gives the same text (greedy, and seeded at temperature 0.8); a stop string
    ends the answer at the same place (never past it); llama-server's flat keys work; bad values are the API's
    400 naming the field; /metrics counts."""
    base = up_ngram
    _wait_plan(base, 3)
    plain = _complete(base, speculative={"draft": "off"})["choices"][0]["text"]
    assert _complete(base)["choices"][0]["text"] == plain
    assert _complete(base, **{"speculative.n_max": 2})["choices"][0]["text"] == plain
    seeded = {"temperature": 0.8, "seed": 7, "max_tokens": 48, "ignore_eos": True}
    hot = _complete(base, speculative={"draft": "off"}, **seeded)["choices"][0]["text"]
    assert _complete(base, **seeded)["choices"][0]["text"] == hot  # seeded: the same tokens with a draft
    stop = plain.split()[6]
    cut = _complete(base, stop=[stop])["choices"][0]
    assert cut["text"] == plain[: plain.index(stop)] and cut["finish_reason"] == "stop"
    short = _complete(base, max_tokens=5)
    assert short["usage"]["completion_tokens"] == 5 and plain.startswith(short["choices"][0]["text"])
    for bad, field in (({"speculative.n_max": 99}, "n_max"), ({"speculative": {"draft": "medusa"}}, "draft")):
        r = httpx.post(
            f"{base}/v1/completions", json={"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": "hi", **bad}, timeout=30
        )
        assert r.status_code == 400 and field in r.json()["error"]["param"], r.text
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    drafted = _metric(metrics, "homering_draft_tokens_total")
    accepted = _metric(metrics, "homering_draft_tokens_accepted_total")
    assert 0 < accepted < drafted and _metric(metrics, "homering_draft_acceptance_rate") == pytest.approx(
        accepted / drafted
    )


def test_logprobs_and_grammar_compose_with_drafting(up_ngram):
    """A drafted answer carries every kept token's logprobs, equal to plain decoding's (the rows of a
    verification trip are the logits one-token decoding gives), and a JSON-schema grammar holds over kept
    drafts (only kept tokens advance it): the same text as without a draft."""
    base = up_ngram
    _wait_plan(base, 3)
    fields = {"logprobs": 2, "max_tokens": 24}
    plain = _complete(base, speculative={"draft": "off"}, **fields)["choices"][0]
    drafted = _complete(base, **fields)["choices"][0]
    assert drafted["text"] == plain["text"] and drafted["logprobs"]["tokens"] == plain["logprobs"]["tokens"]
    assert len(drafted["logprobs"]["token_logprobs"]) == len(plain["logprobs"]["token_logprobs"]) > 0
    assert drafted["logprobs"]["token_logprobs"] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-4)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    texts = [_complete(base, speculative=s, **fmt)["choices"][0]["text"] for s in ({"draft": "off"}, None)]
    assert texts[0] == texts[1] and isinstance(json.loads(texts[1])["n"], int)


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


def test_a_killed_agent_mid_answer_gives_the_plain_answer(up_ngram):
    """An agent killed halfway through a speculative answer: the request resumes on the smaller ring from
    the tokens streamed (only kept tokens were streamed) and ends as the plain answer."""
    base = up_ngram
    before = _wait_plan(base, 3)
    expected, n, _ = _stream(base, prompt=PROMPT, max_tokens=64)
    assert n == 64
    victim = next(a for a in before["agents"] if a["in_plan"] and not a["head"])
    killed = {}

    def kill_halfway(i: int) -> None:
        if i == 24 and not killed:
            os.kill(victim["pid"], signal.SIGKILL)
            killed["at"] = time.monotonic()

    text, n, finish = _stream(base, on_token=kill_halfway, prompt=PROMPT, max_tokens=64)
    assert killed and (n, finish) == (64, "length")
    assert text == expected
    _wait_plan(base, 2)
    plain = _complete(base, speculative={"draft": "off"}, max_tokens=64, ignore_eos=True)["choices"][0]["text"]
    assert plain == expected

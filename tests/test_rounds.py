"""Piped-ring rounds end to end: k windows per agent, a token k times around the ring, on mosquitto.

A module of its own: one broker carries one cluster at a time, so these
clusters start after test_cluster's module-wide cluster has stopped.
"""

from __future__ import annotations

import pytest

from homering.client.chat import ask
from homering.client.client import ClusterClient
from homering.client.local import LocalCluster
from tests.test_cluster import PROMPTS, chat_request, run

SIX_LAYER_MODELS = ["qwen3_small", "qwen3moe_small", "phi3_small", "gemma2_small"]  # conftest's small shapes


@pytest.mark.parametrize(
    "model,agents,rounds",
    [
        ("smollm2", 3, 2),
        ("smollm2", 3, 3),
        ("gemma", 3, 2),
        ("gemma", 3, 3),
        ("smollm2", 1, 3),
        ("qwen2_small", 3, 1),  # qwen2: attention biases, a Q4_K_M mix
        ("qwen2_small", 3, 2),
        # issue 23's shapes at 6 layers: with k = 2 every window holds one layer, so each qwen3moe window is a
        # single MoE layer and gemma2's windows [1, 2), [3, 4), [5, 6) start inside its sliding-window period
        *((m, 3, k) for m in SIX_LAYER_MODELS for k in (1, 2)),
    ],
)
def test_piped_ring_rounds_match_unsplit_model(model, agents, rounds, mosquitto, request, tmp_path):
    """k rounds: every agent holds k windows, a token goes k times around the ring; same greedy tokens, and
    tokens that vary (a random model can repeat one token, which would hide a broken split)."""
    path, ref = request.getfixturevalue(model), request.getfixturevalue(f"{model}_ref")
    with (
        open(tmp_path / "cluster.log", "w") as log_file,
        LocalCluster(
            path,
            n_agents=agents,
            broker=mosquitto,
            threads=1,
            n_ctx=256,
            planner="proportional",
            rounds=rounds,
            log_file=log_file,
        ) as cluster,
    ):

        async def go():
            async with ClusterClient(cluster.broker) as client:
                await client.wait_ready()
                return client.plan, [await ask(client, chat_request(p)) for p in PROMPTS[:2]]

        plan, answers = run(go())
    assert plan.k == rounds and len(plan.ring) == agents
    assert all(len(a.windows) == rounds and [w.round for w in a.windows] == list(range(rounds)) for a in plan.ring)
    # round r covers [r·W, (r+1)·W), its layers in ring order, the head last
    spans = [(w.start, w.end) for r in range(rounds) for a in plan.ring for w in a.windows if w.round == r]
    assert spans[0][0] == 0 and spans[-1][1] == plan.n_layers
    assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    if model in SIX_LAYER_MODELS and rounds == 2:
        assert all(b - a == 1 for a, b in spans)  # single-layer windows
    for answer in answers:
        ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, 32)
        assert len(set(answer.token_ids)) >= 3, answer.token_ids


def test_release_and_micro_batches_keep_tokens(mosquitto, smollm2, smollm2_ref, tmp_path):
    """--release drops every window from the page cache after use, and an 8-token micro-batch puts several
    chunks of a prompt in the 3-round ring at once: the greedy tokens stay those of the unsplit model."""
    with (
        open(tmp_path / "cluster.log", "w") as log_file,
        LocalCluster(
            smollm2,
            n_agents=3,
            broker=mosquitto,
            threads=1,
            n_ctx=256,
            planner="proportional",
            rounds=3,
            n_batch=8,
            agent_args=("--release",),
            log_file=log_file,
        ) as cluster,
    ):

        async def go():
            async with ClusterClient(cluster.broker) as client:
                await client.wait_ready()
                return client.plan, [await ask(client, chat_request(p)) for p in PROMPTS[:2]]

        plan, answers = run(go())
    assert plan.k == 3 and plan.n_batch == 8
    for answer in answers:
        assert len(answer.prompt_token_ids) > 2 * 8  # the prompt really went as several micro-batches
        smollm2_ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, 32)

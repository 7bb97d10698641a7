"""Qwen3, Qwen3-MoE, Phi-3 and Gemma 2 over a ring of 3 agents, k = 1 and k = 2: the unsplit model's greedy
tokens (issue 23).

With 6 layers, k = 2 over 3 agents gives windows of one layer: each MoE window holds a single MoE layer,
and gemma2's windows [1, 2), [3, 4), [5, 6) start inside its sliding-window period of 2 (and hold only a
global-attention layer). A module of its own: one broker carries one cluster at a time.
"""

from __future__ import annotations

import pytest

from homering.client.chat import ask
from homering.client.client import ClusterClient
from homering.client.local import LocalCluster
from tests.test_cluster import PROMPTS, chat_request, run

MODELS = ["qwen3_small", "qwen3moe_small", "phi3_small", "gemma2_small"]


@pytest.mark.parametrize("rounds", [1, 2])
@pytest.mark.parametrize("model", MODELS)
def test_ring_matches_unsplit_model(model, rounds, mosquitto, request, tmp_path):
    """Every agent holds k windows; two prompts give the unsplit model's greedy tokens, tokens that vary."""
    path, ref = request.getfixturevalue(model), request.getfixturevalue(f"{model}_ref")
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
        ) as cluster,
    ):

        async def go():
            async with ClusterClient(cluster.broker) as client:
                await client.wait_ready()
                return client.plan, [await ask(client, chat_request(p)) for p in PROMPTS[:2]]

        plan, answers = run(go())
    assert plan.k == rounds and len(plan.ring) == 3
    spans = sorted((w.start, w.end) for a in plan.ring for w in a.windows)
    assert len(spans) == 3 * rounds and spans[0][0] == 0 and spans[-1][1] == plan.n_layers
    assert all(x[1] == y[0] for x, y in zip(spans, spans[1:]))
    if rounds == 2:
        assert all(b - a == 1 for a, b in spans)  # single-layer windows: one MoE layer; gemma2 cut at odd layers
    for answer in answers:
        ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, 32)
        assert len(set(answer.token_ids)) >= 3, answer.token_ids

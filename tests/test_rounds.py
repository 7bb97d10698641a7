"""Piped-ring rounds end to end: k windows per agent, a token k times around the ring, on mosquitto.

A module of its own: one broker carries one cluster at a time, so these
clusters start after test_cluster's module-wide cluster has stopped.
"""

from __future__ import annotations

import pytest

from homering.api.chat import ask
from homering.cluster.client import ClusterClient
from homering.cluster.local import LocalCluster
from tests.test_cluster import PROMPTS, chat_request, run



@pytest.mark.parametrize("model,agents,rounds", [("smollm2", 3, 2), ("smollm2", 3, 3), ("gemma", 3, 2),
                                                 ("gemma", 3, 3), ("smollm2", 1, 3)])
def test_piped_ring_rounds_match_unsplit_model(model, agents, rounds, mosquitto, request, tmp_path):
    """k rounds: every agent holds k windows, a token goes k times around the ring; same greedy tokens."""
    path, ref = request.getfixturevalue(model), request.getfixturevalue(f"{model}_ref")
    with open(tmp_path / "cluster.log", "w") as log_file, LocalCluster(
            path, n_agents=agents, broker=mosquitto, threads=1, n_ctx=256, planner="proportional",
            rounds=rounds, log_file=log_file) as cluster:
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
    for answer in answers:
        ref.check_answer(answer.prompt_token_ids, answer.token_ids, answer.finish_reason, 32)

"""Planners: who runs which layers.

Every planner is a function ``(profiles, n_layers) -> [(name, n_layers_of_agent)]``
in ring order (head last); :func:`make_plan` turns its answer into a
:class:`~homering.cluster.schema.Plan`. The Halda planner (PRIMA.CPP §3)
plugs in here.
"""

from __future__ import annotations

import uuid
from typing import Callable

from homering.cluster.schema import AgentProfile, Plan, PlanAgent, WindowAssignment
from homering.errors import HomeringError
from homering.planner.proportional import plan_proportional

Planner = Callable[[list[AgentProfile], int], list[tuple[str, int]]]

PLANNERS: dict[str, Planner] = {"proportional": plan_proportional}


def make_plan(profiles: list[AgentProfile], *, n_layers: int, model_path: str, model_fingerprint: str,
              n_ctx: int, n_batch: int = 256, planner: str = "proportional") -> Plan:
    """Assign contiguous layer windows to agents and build the ring.

    Raises:
        HomeringError: unknown planner, or no agents.
    """
    if not profiles:
        raise HomeringError("no agents to plan for")
    try:
        fn = PLANNERS[planner]
    except KeyError:
        raise HomeringError(f"unknown planner {planner!r}: use one of {', '.join(PLANNERS)}") from None
    shares = fn(profiles, n_layers)
    by_name = {p.name: p for p in profiles}
    ring, start = [], 0
    for name, count in shares:
        if count == 0:
            continue
        p = by_name[name]
        ring.append(PlanAgent(name=name, host=p.host, data_port=p.data_port,
                              windows=[WindowAssignment(start=start, end=start + count)]))
        start += count
    assert start == n_layers, "planner must assign every layer"
    return Plan(plan_id=uuid.uuid4().hex[:12], model_path=model_path, model_fingerprint=model_fingerprint,
                n_layers=n_layers, n_ctx=n_ctx, n_batch=n_batch, planner=planner, ring=ring)

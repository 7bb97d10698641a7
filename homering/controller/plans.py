"""From agents' profiles to a :class:`~homering.wire.Plan`: the planner's devices in, the ring message out.

The planner (:mod:`homering.planner`) knows nothing of agents or the wire; this module
turns published :class:`~homering.wire.AgentProfile` s into its devices, picks the head,
and turns the planner's answer into the retained plan message.
"""

from __future__ import annotations

import logging
import uuid

from homering.planner import DEFAULT_BATCH, plan_cluster, wants_release
from homering.planner.model import Device, DevicePrediction, ModelShape, PlanError, parse_cluster
from homering.wire import AgentProfile, Plan, PlanAgent, PredictedCost, WindowAssignment

log = logging.getLogger("homering.controller")


def head_of(profiles: list[AgentProfile], draft_bytes: int = 0, head_bytes: int = 0) -> AgentProfile:
    """The head: the agent with the most available RAM (ties: by name).

    The measured device profile's RAM counts when there is one (it sees cgroup
    limits); the machine-wide ``ram_available`` otherwise.

    With a draft model of ``draft_bytes`` (speculative decoding, ``--draft MODEL``), the head drafts every
    token on its own CPU, beside its own share of the ring: a draft costs about as much as the whole target
    on one core (SmolLM2 Q4_1 drafting for its F16 twin: 11.4 against 13.2 ms per token here). The head is
    then, among the agents whose RAM holds the draft and the least a head holds of the target,
    ``head_bytes`` (:attr:`ModelShape.head_bytes`: its output head and one layer with its buffers), the one
    with the least CPU time per token for a draft and its share, ``cpu_ms_per_layer · (1 + share)``, its
    share estimated as its part of the agents' RAM (as the memory-driven planners split the layers; ties:
    more RAM); the most RAM when none fits. On home4 (``bench speculative``) the F16 pair ran 1.48-1.82x plain
    decoding with D1 (1.0 core, 215 MiB: 4 of 30 layers) as head in 12 invocations, 1.24-1.42x with D3
    (0.875 core, 1187 MiB: 16 layers) in 4, although its profile measured D3 7% faster per layer. This is what
    prima.cpp's speculative mode leaves to the user, who starts the draft on the head (rank 0).
    """

    def ram(p: AgentProfile) -> float:
        return p.device.ram_gib * (1 << 30) if p.device is not None else p.ram_available

    most_ram = max(profiles, key=lambda p: (ram(p), [-ord(c) for c in p.name]))
    if draft_bytes <= 0:
        return most_ram
    fits = [p for p in profiles if p.device is not None and ram(p) >= draft_bytes + head_bytes]
    total = sum(ram(p) for p in profiles) or 1.0

    def busy(p: AgentProfile) -> float:  # CPU time per token, per layer of the target: a draft and its share
        return (p.device.cpu_ms_per_layer if p.device else 0.0) * (1 + ram(p) / total)

    head = min(fits, key=lambda p: (busy(p), -ram(p), p.name), default=most_ram)
    seen = ", ".join(
        f"{p.name} {ram(p) / 2**20:.0f} MiB {p.device.cpu_ms_per_layer if p.device else 0:.3f} ms/layer"
        for p in profiles
    )
    why = "the least busy with RAM for the draft and a head's share" if fits else "no agent has that RAM: the most"
    log.info("head %s (%s, %.0f + %.0f MiB): %s", head.name, why, draft_bytes / 2**20, head_bytes / 2**20, seen)
    return head


def devices_from_profiles(profiles: list[AgentProfile], draft_bytes: int = 0, head_bytes: int = 0) -> list[Device]:
    """Planner devices from agents' measured profiles, sorted by name, the head (:func:`head_of`, with a draft
    model of ``draft_bytes`` and a target of which a head holds at least ``head_bytes``) flagged and last.

    The head's own ``link_*`` (its hop back to the ring's first device) is the
    median of the others' links to it, assuming a symmetric LAN. Its RAM is not charged for the draft model: the
    draft's weights are mapped pages that the kernel reclaims first while drafts are not kept (γ = 0), and a
    plan made for a busy draft stays when the draft is idle. Charged, the 1B no-agreement pair of ``bench
    speculative`` put its head in overflow mode, streaming its layers from disk every token (1.0 against 10.7
    tokens/s); uncharged, a busy draft that crowds the head slows the trips it drafts for, and γ falls.

    Raises:
        PlanError: an agent has not published a measured device profile.
    """
    devices = {p.name: p.device for p in profiles if p.device is not None}
    missing = [p.name for p in profiles if p.name not in devices]
    if missing:
        raise PlanError(f"agents without a device profile: {', '.join(missing)}")
    head = head_of(profiles, draft_bytes, head_bytes)
    others = sorted((p for p in profiles if p.name != head.name), key=lambda p: p.name)
    links = sorted((d.link_ms, d.link_mbps) for p in others if (d := devices[p.name]).link_mbps > 0)
    mid = links[len(links) // 2] if links else (0.0, 10_000.0)
    out = []
    for p in others + [head]:
        d = devices[p.name]
        link_ms, link_mbps = (d.link_ms, d.link_mbps) if p is not head else mid
        out.append(
            Device(
                name=p.name,
                os=d.os,
                ram_gib=d.ram_gib,
                disk_gbps=d.disk_gbps,
                fault_gbps=d.fault_gbps,
                cpu_ms_per_layer=d.cpu_ms_per_layer,
                cpu_ms_output=d.cpu_ms_output,
                gpu=d.gpu,
                link_ms=link_ms,
                link_mbps=link_mbps if link_mbps > 0 else 10_000.0,
                head=p is head,
            )
        )
    return out


def pipeline_depth(agents: list[AgentProfile]) -> int:
    """How many of these agents can compute at the same time: per host, the agents on it, at most its cores
    divided by the threads each agent uses (several agents on one machine share its cores).

    Used by the head to spread concurrent requests over that many groups (see
    ``_Loaded.submit`` in :mod:`homering.agent.agent`): more groups than
    this only queue, fewer leave devices idle.
    """
    by_host: dict[str, list[AgentProfile]] = {}
    for a in agents:
        by_host.setdefault(a.host, []).append(a)
    return max(
        1,
        sum(
            min(len(group), max(1, min(a.cpu_count for a in group) // max(1, max(a.threads for a in group))))
            for group in by_host.values()
        ),
    )


def make_plan(
    profiles: list[AgentProfile],
    shape: ModelShape,
    *,
    model_path: str,
    model_fingerprint: str,
    n_ctx: int,
    n_batch: int = DEFAULT_BATCH,
    n_parallel: int = 1,
    planner: str = "halda",
    ks: list[int] | None = None,
    draft_bytes: int = 0,
) -> Plan:
    """Plan the agents' layer windows and build the ring message (the head drafts with a draft model of
    ``draft_bytes``, 0: none; see :func:`head_of`).

    Agents the planner drops are left out of the ring. ``shape`` should
    count the KV cache of all ``n_parallel`` sequences and the compute buffers at ``n_batch`` (see
    :func:`~homering.planner.model.shape_from_gguf`).

    Raises:
        PlanError: no agents, unknown planner, missing device profiles, infeasible.
    """
    if not profiles:
        raise PlanError("no agents to plan for")
    spec = parse_cluster(
        {
            "model": shape.model_dump(),
            "devices": [d.model_dump() for d in devices_from_profiles(profiles, draft_bytes, shape.head_bytes)],
        }
    )
    result = plan_cluster(spec, planner, ks)
    by_name = {p.name: p for p in profiles}
    ring = [_place(d, by_name[d.name], result.prediction.k) for d in result.prediction.in_use]
    return Plan(
        plan_id=uuid.uuid4().hex[:12],
        model_path=model_path,
        model_fingerprint=model_fingerprint,
        pipeline_depth=pipeline_depth([by_name[a.name] for a in ring]),
        n_layers=shape.n_layers,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_parallel=n_parallel,
        planner=planner,
        k=result.prediction.k,
        predicted_ms_per_token=result.prediction.ms_per_token,
        solve_ms=result.solve_ms,
        dropped=result.prediction.dropped,
        ring=ring,
    )


def _place(d: DevicePrediction, p: AgentProfile, k: int) -> PlanAgent:
    """Agent ``p``'s place in the ring from the planner's prediction ``d`` for it (``k`` rounds)."""
    return PlanAgent(
        name=d.name,
        host=p.host,
        data_port=p.data_port,
        mode=d.mode,
        release=wants_release(d.mode, k),
        keep_bytes=d.keep_bytes if d.gpu_layers_per_round == 0 else None,
        link_ms=p.device.link_ms if p.device else None,
        windows=[
            WindowAssignment(start=a, end=b, round=r, gpu_layers=d.gpu_layers_per_round)
            for r, (a, b) in enumerate(d.windows)
        ],
        predicted=PredictedCost(compute_ms=d.compute_ms, disk_ms=d.disk_ms, hop_ms=d.hop_ms, disk_bytes=d.disk_bytes),
    )

"""The cluster's routes: ``GET /health`` (open, for health checks) and ``GET /v1/cluster`` (the agents and the plan).

``GET /health`` answers 200 ``{"status": "ok", …}`` while requests can be served, else 503
``{"status": "degraded", "reason": …}``: no plan (or no ring) is ready, or no KV sequence has been free for
longer than a request is predicted to take (the plan's ms/token times the default ``max_tokens``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter
from fastapi.params import Depends
from fastapi.responses import JSONResponse

from homering.api.responses import ClusterReport, Health
from homering.api.view import ClusterView
from homering.wire import ControllerState


def router(view: ClusterView, *, default_max_tokens: int, auth: Sequence[Depends] = ()) -> APIRouter:
    """The routes of ``view``'s cluster: ``/health`` (never behind ``auth``) and ``/v1/cluster`` (behind it)."""
    routes = APIRouter()

    @routes.get(
        "/health",
        response_model=None,
        responses={
            200: {"model": Health, "description": "requests can be served"},
            503: {
                "model": Health,
                "description": "degraded: no plan is ready, or no sequence has been free for "
                "longer than a request is predicted to take (see `reason`)",
            },
        },
    )
    async def health():
        report = health_report(view, default_max_tokens)
        return JSONResponse(status_code=200 if report["status"] == "ok" else 503, content=report)

    @routes.get("/v1/cluster", response_model=None, responses={200: {"model": ClusterReport}}, dependencies=list(auth))
    async def cluster():
        return cluster_report(view)

    return routes


def _degraded(view: ClusterView, busy_s: float | None, predicted_s: float | None, n_tokens: int) -> str | None:
    """Why requests cannot be served now (see :func:`health_report`), or None."""
    plan, seqs = view.plan, view.sequences
    failed = f"the cluster failed: {view.detail}" if view.state == ControllerState.ERROR else None
    if plan is None or not plan.ring:
        return failed or "no plan is ready: the agents are still joining or loading"
    if not view.ready:
        return failed or (
            f"plan {plan.plan_id} is not ready ({view.state}"
            f"{': ' + view.detail if view.detail else ''}); requests wait for a plan"
        )
    if busy_s is not None and predicted_s is not None and busy_s > predicted_s:
        ms = plan.predicted_ms_per_token or 0.0
        return (
            f"no sequence has been free for {busy_s:.1f} s, longer than a request is predicted to take "
            f"({predicted_s:.1f} s: {n_tokens} tokens at {ms:.1f} ms/token); all {seqs.n} are busy and "
            f"{seqs.queue_depth} request(s) are waiting"
        )
    return None


def health_report(view: ClusterView, default_max_tokens: int) -> dict[str, Any]:
    """``GET /health``'s body (:class:`~homering.api.responses.Health`): ``ok``, or ``degraded`` and why requests
    cannot be served.

    Degraded: no plan or no ring, the plan is not ready (agents joining,
    loading, re-planning, or an error), or no sequence has been free for
    ``busy_s`` seconds, longer than a request is predicted to take: the plan's
    ``predicted_ms_per_token`` times the default ``max_tokens`` (bounded by the
    context). A request arriving then would wait at least that long.
    """
    plan = view.plan
    seqs = view.sequences
    busy_s = time.monotonic() - seqs.busy_since if seqs.busy_since is not None else None
    n_tokens = min(default_max_tokens, view.n_ctx or default_max_tokens)
    ms = plan.predicted_ms_per_token if plan is not None else None
    predicted_s = ms * n_tokens / 1000 if ms else None
    reason = _degraded(view, busy_s, predicted_s, n_tokens)
    return {
        "status": "degraded" if reason else "ok",
        "reason": reason,
        "state": view.state,
        "model": view.model_id,
        "agents": len(view.live_agents()),
        "plan_id": plan.plan_id if plan is not None else None,
        "sequences": seqs.n,
        "sequences_busy": seqs.in_use,
        "queue_depth": seqs.queue_depth,
        "busy_s": round(busy_s, 3) if busy_s is not None else None,
        "predicted_request_s": round(predicted_s, 3) if predicted_s is not None else None,
    }


def _agent(view: ClusterView, name: str, live: set[str]) -> dict[str, Any]:
    """One agent's entry of ``/v1/cluster`` (``live``: the names of the live agents)."""
    plan = view.plan
    prof = view.profiles[name]
    status = view.statuses.get(name)
    st = view.agent_stats.get(name)
    pa = next((a for a in plan.ring if a.name == name), None) if plan else None
    link = view.links.get(name)
    return {
        "name": name,
        "host": prof.host,
        "pid": prof.pid,
        "data_port": prof.data_port,
        "status": status.state if status else "unknown",
        "live": name in live,
        "head": bool(plan and plan.head.name == name),
        "in_plan": pa is not None,
        "windows": [w.model_dump() for w in pa.windows] if pa else [],
        "mode": pa.mode if pa else None,
        "predicted": pa.predicted.model_dump() if pa and pa.predicted else None,
        "profile": prof.device.model_dump() if prof.device else None,
        "link_ms": link[0] if link else None,
        "link_mbps": link[1] if link else None,
        "stats": st.model_dump() if st else None,
    }


def cluster_report(view: ClusterView) -> dict[str, Any]:
    """``GET /v1/cluster`` (:class:`~homering.api.responses.ClusterReport`): the agents, the plan (predicted and
    measured ms/token) and the broker; agents that were lost stay listed with ``live`` false."""
    plan = view.plan
    live = {p.name for p in view.live_agents()}
    return {
        "model": view.model_id,
        "state": view.state,
        "broker": str(view.broker),
        "n_ctx": view.n_ctx,
        "n_parallel": view.n_parallel,
        "requests_in_flight": len(view.in_flight),
        "queue_depth": view.sequences.queue_depth,
        "agents": [_agent(view, name, live) for name in sorted(view.profiles)],
        "plan": None
        if plan is None
        else {
            "plan_id": plan.plan_id,
            "planner": plan.planner,
            "k": plan.k,
            "n_layers": plan.n_layers,
            "ring": [a.name for a in plan.ring],
            "dropped": plan.dropped,
            "head": plan.head.name,
            "predicted_ms_per_token": plan.predicted_ms_per_token,
            "measured_ms_per_token": view.measured_ms_per_token,
        },
    }

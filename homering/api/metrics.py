"""Prometheus metrics of the controller (``GET /metrics``, behind the API key), with ``prometheus_client``.

Request counters and histograms are updated as requests finish; the cluster's
state (agents up, queue depth, per-window compute time and each live agent's memory from the agents'
:class:`~homering.wire.AgentStats`) is read at scrape time by a
custom collector, so it is never stale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.params import Depends
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from homering.wire import EventType

if TYPE_CHECKING:
    from homering.api.view import ClusterView
    from homering.wire import StreamEvent

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Prometheus text exposition format's media type."""
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The controller's metrics in their own registry (``homering_*``).

    Args:
        view: the cluster (the controller), read at scrape time for the gauges.
    """

    def __init__(self, view: ClusterView):
        self.registry = CollectorRegistry()
        self.tokens = Counter(
            "homering_tokens_generated", "Tokens generated (sampled on the head)", registry=self.registry
        )
        self.prompt_tokens = Counter("homering_prompt_tokens", "Prompt tokens prefilled", registry=self.registry)
        self.requests = Counter("homering_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        self.latency = Histogram(
            "homering_request_latency_seconds",
            "Time from admission to the last token",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "homering_ttft_seconds",
            "Time to first token, measured on the head",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "homering_token_latency_seconds",
            "Mean decode time per token (TPOT) of a request",
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_ClusterCollector(view))
        self.tokens_total = 0
        self._speculative_metrics()

    def finished(self, event: StreamEvent, seconds: float) -> None:
        """Count a request whose last event (``done`` or ``error``) arrived ``seconds`` after admission."""
        if event.type == EventType.ERROR:
            self.requests.labels("error").inc()
            return
        self.requests.labels(event.finish_reason or "stop").inc()
        n = len(event.token_ids or [])
        self.tokens.inc(n)
        self.tokens_total += n
        self.prompt_tokens.inc(len(event.prompt_token_ids or []))
        self.latency.observe(seconds)
        if event.ttft_ms is not None:
            self.ttft.observe(event.ttft_ms / 1000)
        if event.ms_per_token is not None and n > 1:
            self.tpot.observe(event.ms_per_token / 1000)
        if event.drafted:
            self.drafted.inc(event.drafted)
            self.accepted.inc(event.accepted or 0)
            self.drafted_total += event.drafted
            self.accepted_total += event.accepted or 0
            self.acceptance.set(self.accepted_total / self.drafted_total)

    def _speculative_metrics(self) -> None:
        """Speculative decoding's counters: draft tokens sent to be verified, kept, and their ratio."""
        self.drafted = Counter(
            "homering_draft_tokens", "Draft tokens verified by the ring (speculative decoding)", registry=self.registry
        )
        self.accepted = Counter(
            "homering_draft_tokens_accepted", "Draft tokens the target model kept", registry=self.registry
        )
        self.acceptance = Gauge(
            "homering_draft_acceptance_rate", "Accepted / drafted tokens since the start", registry=self.registry
        )
        self.drafted_total = self.accepted_total = 0

    def count(self, outcome: str) -> None:
        """Count a request that ended without an answer: ``queue_full``, ``cancelled``."""
        self.requests.labels(outcome).inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)


class _ClusterCollector:
    """Gauges of the cluster's state, computed from the controller when scraped."""

    def __init__(self, view: ClusterView):
        self.c = view

    def describe(self):
        return []

    def collect(self):
        c = self.c
        live = {p.name for p in c.live_agents()}
        ring = {a.name for a in c.plan.ring} if c.plan else set()
        up = GaugeMetricFamily("homering_agents_up", "Agents connected (not offline or failed)")
        up.add_metric([], len(live))
        yield up
        in_ring = GaugeMetricFamily("homering_agents_in_plan", "Agents in the current plan's ring")
        in_ring.add_metric([], len(ring))
        yield in_ring
        depth = GaugeMetricFamily("homering_queue_depth", "Requests waiting for a KV sequence")
        depth.add_metric([], c.sequences.queue_depth)
        yield depth
        flight = GaugeMetricFamily("homering_requests_in_flight", "Requests being generated")
        flight.add_metric([], len(c.in_flight))
        yield flight
        ready = GaugeMetricFamily("homering_ready", "1 when a plan is loaded and requests are served")
        ready.add_metric([], 1.0 if c.ready else 0.0)
        yield ready
        if c.plan and c.plan.predicted_ms_per_token is not None:
            pred = GaugeMetricFamily(
                "homering_predicted_seconds_per_token", "The plan's predicted decode time per token, seconds"
            )
            pred.add_metric([], c.plan.predicted_ms_per_token / 1000)
            yield pred
        labels = ["agent", "window", "round"]
        compute = CounterMetricFamily(
            "homering_window_compute_seconds", "Time an agent spent in a layer window's forward", labels=labels
        )
        forwards = CounterMetricFamily("homering_window_forwards", "Forward passes of a layer window", labels=labels)
        mem = GaugeMetricFamily("homering_agent_rss_bytes", "Resident memory of an agent process", labels=["agent"])
        plan_id = c.plan.plan_id if c.plan else None
        for name, st in sorted(c.agent_stats.items()):
            if name not in live:
                continue
            # every agent that is up has a process, in the plan or not (dropped, joined since, re-planning)
            mem.add_metric([name], st.rss_bytes)
            if st.plan_id != plan_id:  # its windows belong to another plan (or none)
                continue
            for w in st.windows:
                key = [name, f"{w.start}-{w.end}", str(w.round)]
                compute.add_metric(key, w.compute_ms / 1000)
                forwards.add_metric(key, w.forwards)
        yield compute
        yield forwards
        yield mem


def router(view: ClusterView, *, auth: Sequence[Depends] = ()) -> APIRouter:
    """``GET /metrics`` (behind ``auth``): ``view.metrics`` in the Prometheus text format."""
    routes = APIRouter()

    @routes.get(
        "/metrics",
        response_class=PlainTextResponse,
        dependencies=list(auth),
        responses={200: {"description": "Prometheus text exposition format 0.0.4"}},
    )
    async def metrics():
        return Response(view.metrics.exposition(), media_type=CONTENT_TYPE)

    return routes

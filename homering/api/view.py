"""What the HTTP API may see and do of the cluster: the :class:`ClusterView` protocol.

The API's routers read this protocol, never the controller's class, so that ``api/``
imports nothing from ``controller/`` (the controller passes itself, or an adapter, to
:func:`homering.api.app.serve`). Everything here is read on the controller's event loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from homering.wire import AgentProfile, AgentStats, AgentStatus, GenerateRequest, Plan, StreamEvent, WindowFile


class RequestRefused(Exception):
    """A request the cluster refuses before any token: an HTTP ``status``, a message and an OpenAI error ``code``.

    Raised by :meth:`ClusterView.submit`; the API answers it as an error object.
    """

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class ClusterView(Protocol):
    """The cluster as the API sees it (the controller implements it).

    Attributes are snapshots: the API never changes them. ``links`` maps an agent to its
    measured (one-way ms, Mbit/s) link to the head.
    """

    broker: object
    model_path: Path
    n_ctx: int
    n_parallel: int
    api_key: str | None
    started: float
    fingerprint: str | None
    plan: Plan | None
    state: str
    detail: str | None
    profiles: dict[str, AgentProfile]
    statuses: dict[str, AgentStatus]
    agent_stats: dict[str, AgentStats]
    links: dict[str, tuple[float, float]]

    @property
    def model_id(self) -> str: ...

    @property
    def ready(self) -> bool: ...

    @property
    def measured_ms_per_token(self) -> float | None: ...

    def live_agents(self) -> list[AgentProfile]: ...

    def submit(self, req: GenerateRequest) -> AsyncIterator[StreamEvent]: ...

    def window_file(self, sha256: str) -> Path | None: ...

    async def probe_window(self, label: str) -> WindowFile | None: ...

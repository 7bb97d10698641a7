"""The cluster's state messages: agents' profiles, statuses and stats, the plan, link probes, and the
controller's status and stats (see the topic table in :mod:`homering.wire`)."""

from __future__ import annotations

import zlib
from typing import ClassVar, Literal

from pydantic import Field

from homering.profiler.profile import DeviceProfile
from homering.wire.base import NAME, SCHEMA_VERSION, Message, WireEnum


class AgentState(WireEnum):
    """An agent's :attr:`AgentStatus.state` (a ``str``: compares equal to its value)."""

    ONLINE = "online"
    LOADING = "loading"
    READY = "ready"
    ERROR = "error"
    OFFLINE = "offline"


LIVE_AGENT_STATES = frozenset({AgentState.ONLINE, AgentState.LOADING, AgentState.READY})
"""States of an agent that is up (it may be planned in)."""


class ControllerState(WireEnum):
    """The controller's :attr:`ControllerStatus.state` (a ``str``: compares equal to its value)."""

    WAITING = "waiting"
    PLANNING = "planning"
    READY = "ready"
    OFFLINE = "offline"
    ERROR = "error"


class AgentProfile(Message):
    """What an agent publishes about its device (retained)."""

    SIGNED: ClassVar[bool] = True

    name: str = Field(pattern=NAME)
    host: str
    data_port: int = Field(ge=1, le=65535)
    pid: int
    os: str
    cpu_count: int = Field(ge=1)
    threads: int = Field(ge=1)
    ram_total: int = Field(ge=0, description="bytes")
    ram_available: int = Field(ge=0, description="bytes")
    device: DeviceProfile | None = Field(default=None, description="measured for the controller's model")
    version: int = SCHEMA_VERSION


class AgentStatus(Message):
    """An agent's state (retained; the last-will sets ``offline``).

    ``name`` is the agent's (its topic's); ``session`` is random per agent process, so
    that a receiver can tell this process's last-will (signed when it connected,
    hence older than its later statuses) from an old process's (see
    :class:`~homering.wire.security.NewestState`).
    """

    SIGNED: ClassVar[bool] = True

    name: str | None = Field(default=None, pattern=NAME)
    session: str | None = Field(default=None, pattern=r"^[0-9a-f]{1,32}$")
    state: AgentState
    plan_id: str | None = None
    detail: str | None = None

    def ready_on(self, plan_id: str | None) -> bool:
        """This agent has loaded plan ``plan_id`` and serves it."""
        return self.state == AgentState.READY and plan_id is not None and self.plan_id == plan_id


SHA256 = r"^[0-9a-f]{64}$"
WINDOWS_PATH = "/windows"
"""Window distribution's routes, under the API base URL (:attr:`ControllerStatus.api`, ``…/v1``)."""
WindowRole = Literal["whole", "first", "middle", "last"]


class WindowAssignment(Message):
    """One layer window [start, end) of the model on one agent, in round ``round``.

    ``sha256`` and ``size`` describe the window file the controller sliced
    (deterministically: an agent slicing the same model gets the same bytes);
    an agent checks every window file it loads against them, and one without
    the model downloads the file by its hash. None in plans of controllers
    that do not hash windows.
    """

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    round: int = Field(ge=0, default=0)
    gpu_layers: int = Field(ge=0, default=0, description="layers of the window offloaded to the GPU")
    sha256: str | None = Field(default=None, pattern=SHA256, description="SHA-256 of the window file, hex")
    size: int | None = Field(default=None, ge=0, description="size of the window file, bytes")


class WindowFile(Message):
    """A window file the controller serves (``GET /v1/windows/probe/…`` answers one)."""

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    role: WindowRole
    sha256: str = Field(pattern=SHA256, description="SHA-256 of the file, hex")
    size: int = Field(ge=0, description="bytes")


class ModelFacts(Message):
    """Shape facts of the controller's model (its GGUF header): what an agent without the model file
    needs to plan its profiling probes (see :func:`homering.profiler.compute.probe_plan`)."""

    arch: str
    name: str
    n_layers: int = Field(ge=1)
    n_embd: int = Field(ge=1)
    n_ctx_train: int = Field(ge=0)
    size_bytes: int = Field(ge=0, description="the model file's size, bytes")
    layer_bytes: list[int] = Field(description="tensor bytes of each block, n_layers of them")
    n_expert: int = Field(default=0, ge=0, description="experts per MoE layer (0: dense)")
    n_expert_used: int = Field(default=0, ge=0, description="experts each token is routed to")
    layer_active_bytes: list[int] = Field(
        default_factory=list, description="tensor bytes of each block one token uses (MoE; empty: all)"
    )
    routing_tokens: list[int] = Field(
        default_factory=list,
        description="a MoE: the routing probe's text in the model's token ids (homering.profiler.experts); "
        "the windows an agent profiles on keep no tokenizer",
    )


class PredictedCost(Message):
    """An agent's predicted share of the token latency, ms summed over the k rounds."""

    compute_ms: float
    disk_ms: float
    hop_ms: float
    disk_bytes: float | None = Field(default=None, ge=0, description="bytes read from disk per token")


class PlanAgent(Message):
    """An agent's place in the ring."""

    name: str = Field(pattern=NAME)
    host: str
    data_port: int = Field(ge=1, le=65535)
    windows: list[WindowAssignment]
    mode: Literal["resident", "overflow", "stream"] | None = None
    predicted: PredictedCost | None = None
    release: bool = Field(
        default=False,
        description="drop each window from the page cache after use "
        "(the planner's choice for devices in stream mode with k > 1)",
    )
    keep_bytes: int | None = Field(
        default=None,
        ge=0,
        description="overflow mode: bytes of its layers' weights the agent keeps in memory, in the order it "
        "computes them; the later layers stream from disk every token (None: the kernel decides)",
    )
    link_ms: float | None = Field(default=None, description="measured one-way latency to the head, ms")


class Plan(Message):
    """The layer assignment (retained, published by the controller).

    ``ring`` is in data-flow order: tokens enter at ``ring[0]`` (which holds
    layer 0) and the head, ``ring[-1]``, holds the last layers and the output,
    samples, and sends the next token to ``ring[0]``.
    """

    SIGNED: ClassVar[bool] = True

    plan_id: str
    model_path: str
    model_fingerprint: str
    n_layers: int = Field(ge=1)
    n_ctx: int = Field(ge=16, description="context (KV cache) of one sequence, tokens")
    n_batch: int = Field(ge=1, default=256)
    n_parallel: int = Field(
        ge=1,
        le=256,
        default=1,
        description="sequences every window's KV cache holds (requests served at once), n_ctx each",
    )
    planner: str
    k: int = Field(ge=1, default=1, description="rounds: windows per agent")
    predicted_ms_per_token: float | None = None
    solve_ms: float | None = None
    dropped: list[str] = Field(default_factory=list, description="agents the planner left out")
    pipeline_depth: int | None = Field(
        default=None,
        ge=1,
        description="ring devices that can compute at once (agents sharing a host share its "
        "cores); the head spreads requests over this many groups [default: every agent of the ring]",
    )
    ring: list[PlanAgent] = Field(min_length=1)

    @property
    def tag(self) -> int:
        """A 32-bit tag of this plan (CRC-32 of its id): HELLO frames carry it, so that a window never runs
        frames a neighbour sent under another plan."""
        return zlib.crc32(self.plan_id.encode())

    @property
    def head(self) -> PlanAgent:
        return self.ring[-1]

    def position(self, name: str) -> int | None:
        """Index of agent ``name`` in the ring, or None when it is not in the plan."""
        for i, a in enumerate(self.ring):
            if a.name == name:
                return i
        return None


class LinkProbe(Message):
    """The controller asks an agent to measure its data-plane link to ``host:port`` (the head)."""

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    probe_id: str = Field(pattern=NAME)
    host: str
    port: int = Field(ge=1, le=65535)


class LinkReport(Message):
    """An agent's answer to :class:`LinkProbe`: one-way latency (ms) and bandwidth (Mbit/s)."""

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    probe_id: str = Field(pattern=NAME)
    link_ms: float = Field(ge=0, default=0.0)
    link_mbps: float = Field(ge=0, default=0.0)
    error: str | None = None


class ControllerStatus(Message):
    """The controller's state (retained; last-will ``offline``)."""

    SIGNED: ClassVar[bool] = True

    state: ControllerState
    model: str | None = None
    model_path: str | None = Field(
        default=None, description="agents that have this file (same fingerprint) profile and slice it themselves"
    )
    model_fingerprint: str | None = None
    n_ctx: int | None = None
    plan_id: str | None = None
    detail: str | None = None
    api: str | None = Field(
        default=None, description="the OpenAI-compatible API's base URL, when served; it also serves the window files"
    )
    model_facts: ModelFacts | None = Field(
        default=None, description="the model's shape: agents without the model file profile from it"
    )


class WindowStats(Message):
    """Work done by one layer window since the agent loaded its plan."""

    start: int = Field(ge=0)
    end: int = Field(ge=1)
    round: int = Field(ge=0, default=0)
    forwards: int = Field(ge=0, default=0, description="llama_decode calls (one per frame or frame batch)")
    tokens: int = Field(ge=0, default=0, description="tokens (rows) computed")
    compute_ms: float = Field(ge=0, default=0.0, description="total time in the window's forward, ms")

    @property
    def ms_per_forward(self) -> float | None:
        return self.compute_ms / self.forwards if self.forwards else None


class AgentStats(Message):
    """An agent's telemetry (retained, every few seconds): what ``/metrics``,
    ``/v1/cluster``, ``homering chat``'s ``/cluster`` and Home Assistant show."""

    SIGNED: ClassVar[bool] = True

    name: str = Field(pattern=NAME)
    plan_id: str | None = None
    layers: int = Field(ge=0, default=0, description="layers held, summed over the windows")
    windows: list[WindowStats] = Field(default_factory=list)
    tokens_generated: int = Field(ge=0, default=0, description="head only: tokens sampled since start")
    tokens_per_s: float = Field(
        ge=0,
        default=0.0,
        description="head: tokens sampled per second in its most "
        "recent run of work (the answer now, or the "
        "last one); others: rows computed",
    )
    rss_bytes: int = Field(ge=0, default=0, description="resident memory of the agent process, bytes")
    anon_bytes: int = Field(ge=0, default=0, description="anonymous (non-file) resident memory, bytes")
    requests_active: int = Field(ge=0, default=0, description="head only: sequences being generated")


class ControllerStats(Message):
    """The controller's telemetry (retained, every few seconds)."""

    SIGNED: ClassVar[bool] = True

    model: str | None = None
    requests_in_flight: int = Field(ge=0, default=0)
    queue_depth: int = Field(ge=0, default=0)
    n_parallel: int = Field(ge=1, default=1)
    tokens_generated: int = Field(ge=0, default=0)

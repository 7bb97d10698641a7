"""The wire format: every MQTT topic and message, and the binary data-plane frame.

This module is the only place the wire format is defined.

MQTT (JSON payloads, pydantic models; ``<p>`` is the topic prefix, ``homering``):

=================================  ==========  ===================================
topic                              retained    payload
=================================  ==========  ===================================
``<p>/agents/<name>/profile``      yes         :class:`AgentProfile`
``<p>/agents/<name>/status``       yes (will)  :class:`AgentStatus`
``<p>/agents/<name>/generate``     no          :class:`GenerateJob` (head only)
``<p>/agents/<name>/probe``        no          :class:`LinkProbe` (controller → agent)
``<p>/agents/<name>/probe/result`` no          :class:`LinkReport` (agent → controller)
``<p>/agents/<name>/stats``        yes         :class:`AgentStats` (every few seconds)
``<p>/agents/<name>/cancel``       no          :class:`CancelJob` (controller → head)
``<p>/agents/<name>/replay``       no          :class:`StreamReplay` (controller → head)
``<p>/plan``                       yes         :class:`Plan`
``<p>/controller/status``          yes (will)  :class:`ControllerStatus`
``<p>/controller/stats``           yes         :class:`ControllerStats` (every few seconds)
``<p>/requests``                   no          :class:`GenerateRequest`
``<p>/streams/<request_id>``       no          :class:`StreamEvent`
=================================  ==========  ===================================

Signed messages. With a cluster key (:mod:`homering.cluster.security`) every
message that changes what a client sees or what a process does is signed
(``Message.SIGNED``): :class:`Plan`, :class:`ControllerStatus`,
:class:`ControllerStats`, :class:`GenerateJob`, :class:`CancelJob`,
:class:`StreamReplay`, :class:`LinkProbe`, :class:`LinkReport`,
:class:`GenerateRequest`, :class:`StreamEvent`, :class:`AgentProfile`,
:class:`AgentStatus` and :class:`AgentStats`. A signed payload ends with one more JSON member,
so that readers of plain JSON (Home Assistant's templates) still see every
field::

    {…the message's JSON…,"_auth":{"ts":TS,"nonce":"N","mac":"M"}}

``TS`` is the sender's clock in integer milliseconds, ``N`` 16 random bytes
(32 hex digits), ``M`` 64 hex digits of HMAC-SHA256(key, "homering-msg-v1",
class name, TS, N, body) over length-prefixed parts, where ``body`` is the
message's JSON exactly as sent without the ``_auth`` member (``{…}``).
Receivers with a key drop unsigned and badly signed ones; live messages
(``Message.LIVE``: jobs, probes and their results, requests, stream events)
must also be within :data:`~homering.cluster.security.MAX_AGE_S` of the
receiver's clock and not seen before. An agent's retained state (profile,
status, stats) names the agent in its body, and a receiver keeps only the
newest per agent (:class:`~homering.cluster.security.NewestState`): an old
copy replayed later, or one agent's message on another's topic, is dropped.
Receivers without a key drop signed ones.

Data plane (TCP between ring neighbours, TCP_NODELAY). First a handshake, in
which both ends prove they hold the same cluster key (HMAC-SHA256
challenge–response, fresh nonces from both sides, so a recorded handshake
cannot be replayed), then frames.

================  ==============  ========================================
Window distribution (HTTP, on the controller's API server, same API key as
the API; see :mod:`homering.cluster.windows`):

=======================================================  ====================================
request                                                  answer
=======================================================  ====================================
``GET /v1/windows/<sha256>``                             the window file's bytes (only windows
                                                         of the current plan or probe windows;
                                                         404 for any other hash)
``GET /v1/windows/probe/<start>-<end>-<role>``           :class:`WindowFile` of a probe window
                                                         the profiler may use (404 otherwise)
=======================================================  ====================================

``<sha256>`` is the window file's SHA-256, 64 lower-case hex digits, as in
:attr:`WindowAssignment.sha256`.
"""

from __future__ import annotations

import re
import secrets
import struct
import zlib
import time
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

if TYPE_CHECKING:
    from homering.cluster.security import ClusterKey

PREFIX = "homering"
SCHEMA_VERSION = 1


class Topics:
    """Topic names (see the module table)."""

    @staticmethod
    def profile(name: str) -> str:
        return f"{PREFIX}/agents/{name}/profile"

    @staticmethod
    def status(name: str) -> str:
        return f"{PREFIX}/agents/{name}/status"

    @staticmethod
    def generate(name: str) -> str:
        return f"{PREFIX}/agents/{name}/generate"

    @staticmethod
    def probe(name: str) -> str:
        return f"{PREFIX}/agents/{name}/probe"

    @staticmethod
    def probe_result(name: str) -> str:
        return f"{PREFIX}/agents/{name}/probe/result"

    @staticmethod
    def stats(name: str) -> str:
        return f"{PREFIX}/agents/{name}/stats"

    @staticmethod
    def cancel(name: str) -> str:
        return f"{PREFIX}/agents/{name}/cancel"

    @staticmethod
    def replay(name: str) -> str:
        return f"{PREFIX}/agents/{name}/replay"

    ALL_PROFILES = f"{PREFIX}/agents/+/profile"
    ALL_PROBE_RESULTS = f"{PREFIX}/agents/+/probe/result"
    ALL_STREAMS = f"{PREFIX}/streams/+"
    ALL_STATUS = f"{PREFIX}/agents/+/status"
    ALL_STATS = f"{PREFIX}/agents/+/stats"
    PLAN = f"{PREFIX}/plan"
    CONTROLLER = f"{PREFIX}/controller/status"
    CONTROLLER_STATS = f"{PREFIX}/controller/stats"
    REQUESTS = f"{PREFIX}/requests"

    @staticmethod
    def stream(request_id: str) -> str:
        return f"{PREFIX}/streams/{request_id}"


AUTH_FIELD = "_auth"
MESSAGE_MAC_LABEL = b"homering-msg-v1"
_AUTH_MARK = b'"' + AUTH_FIELD.encode() + b'":{'

_TRAILER = re.compile(rb'"_auth":\{"ts":(\d{1,15}),"nonce":"([0-9a-f]{32})","mac":"([0-9a-f]{64})"\}\}')


class Message(BaseModel):
    """Base of every MQTT payload: strict fields (no extras, finite numbers), JSON encoded.

    ``SIGNED`` classes carry authority: with a cluster key they are sent
    signed and only accepted signed; ``LIVE`` ones are also checked for age
    and replay (see the module docstring).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN/Infinity would reach the planner
    SIGNED: ClassVar[bool] = False
    LIVE: ClassVar[bool] = False
    _signed_at: int | None = PrivateAttr(default=None)

    @property
    def signed_at(self) -> int | None:
        """The sender's clock when it signed this message (ms since the epoch); None when unsigned."""
        return self._signed_at

    def __eq__(self, other: object) -> bool:
        """Equal fields (how a message was signed is no part of its value)."""
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    def dump(self, key: "ClusterKey | None" = None) -> bytes:
        """The payload: the JSON, signed when ``key`` is given and the class is ``SIGNED``."""
        body = self.model_dump_json().encode()
        if key is None or not self.SIGNED:
            return body
        ts = str(int(time.time() * 1000)).encode()
        nonce = secrets.token_hex(16).encode()
        tag = key.mac(MESSAGE_MAC_LABEL, type(self).__name__.encode(), ts, nonce, body).hex().encode()
        trailer = b'"_auth":{"ts":' + ts + b',"nonce":"' + nonce + b'","mac":"' + tag + b'"}}'
        return body[:-1] + (b"," if body != b"{}" else b"") + trailer

    @classmethod
    def load(cls, payload: bytes | bytearray | str, key: "ClusterKey | None" = None):
        """Parse a payload (verifying its signature when ``key`` is given and the class is ``SIGNED``).

        Raises:
            MalformedMessage: anything invalid; :class:`BadSignature` (a subclass) for a
                message that is unsigned, badly signed, stale or replayed when a key is
                configured, or signed when none is.
        """
        try:
            raw = payload.encode() if isinstance(payload, str) else bytes(payload)
        except (UnicodeError, TypeError, ValueError):
            raise MalformedMessage(f"bad {cls.__name__}: not text") from None
        ts = None
        if cls.SIGNED:
            raw, ts = cls._verified(raw, key)
        try:
            msg = cls.model_validate_json(raw)
        except (ValidationError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise MalformedMessage(f"bad {cls.__name__}: {first}") from None
        msg._signed_at = ts
        return msg

    @classmethod
    def _verified(cls, raw: bytes, key: "ClusterKey | None") -> tuple[bytes, int | None]:
        """(body, signing time in ms) of a signed payload, checked against ``key``; ``(raw, None)`` when
        keyless and unsigned."""
        at = raw.rfind(_AUTH_MARK)
        m = _TRAILER.fullmatch(raw, at) if at > 0 else None
        before = raw[at - 1:at] if m else b""
        if m and not (before == b"," or (before == b"{" and at == 1)):
            m = None
        if key is None:
            if m is not None:
                raise MissingKey(f"signed {cls.__name__}, but no cluster key is configured here")
            return raw, None
        if m is None:
            raise BadSignature(f"unsigned {cls.__name__} (this cluster has a key)")
        body = raw[:at - 1] + b"}" if before == b"," else b"{}"
        ts, nonce, tag = m.group(1), m.group(2), bytes.fromhex(m.group(3).decode())
        if not key.verify(tag, MESSAGE_MAC_LABEL, cls.__name__.encode(), ts, nonce, body):
            raise BadSignature(f"bad signature on {cls.__name__}")
        if cls.LIVE:
            why = key.accept_once(nonce, int(ts))
            if why is not None:
                raise BadSignature(f"{cls.__name__} refused: {why}")
        return body, int(ts)


class MalformedMessage(ValueError):
    """A message that does not parse; the receiver logs and drops it."""


class BadSignature(MalformedMessage):
    """A message whose signature is missing, wrong, stale or replayed (or present with no key here)."""


class MissingKey(BadSignature):
    """A signed message where this process has no cluster key: it can never take part in that cluster."""


_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


OsName = Literal["linux", "android", "macos"]


class GpuProfile(Message):
    """A device's GPU as the planner sees it (PRIMA.CPP's device profile, §3.1)."""

    vram_gib: float = Field(ge=0, description="free VRAM, GiB (2^30 bytes)")
    ms_per_layer: float = Field(gt=0, description="decode time of one layer offloaded to the GPU, ms")
    unified: bool = Field(description="GPU memory is system RAM (Apple Metal): GPU layers count in RAM too")


class DeviceProfile(Message):
    """Measured facts of one device for one model: the planner's device inputs.

    Produced by :func:`homering.profiler.profile_device` and published inside
    :class:`AgentProfile`. ``link_ms``/``link_mbps`` describe the link to the
    head; they are measured over the data plane at plan time and are 0/0 until then.
    """

    os: OsName
    ram_gib: float = Field(ge=0, description="RAM available to homering, GiB (2^30 bytes)")
    disk_gbps: float = Field(gt=0, description="read throughput of the window cache's disk, GB/s (1e9 bytes)")
    cpu_ms_per_layer: float = Field(gt=0, description="decode time of one token through one layer on the CPU, ms")
    cpu_ms_output: float = Field(ge=0, description="output norm + vocabulary projection for one token, ms")
    gpu: GpuProfile | None = None
    link_ms: float = Field(ge=0, default=0.0, description="one-way latency to the head, ms")
    link_mbps: float = Field(ge=0, default=0.0, description="bandwidth to the head, Mbit/s (1e6 bits)")
    model_fingerprint: str | None = Field(default=None, description="the model the timings are for")
    threads: int = Field(ge=1, default=1, description="CPU threads the timings were measured with")
    profile_ms: float | None = Field(default=None, description="how long the measurement took, ms (also when "
                                                               "the figures come from the cache: see cached)")
    cached: bool = Field(default=False, description="the slow figures come from this device's profile cache "
                                                    "(measured earlier, not now)")


class AgentProfile(Message):
    """What an agent publishes about its device (retained)."""

    SIGNED: ClassVar[bool] = True

    name: str = Field(pattern=_NAME)
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
    :class:`~homering.cluster.security.NewestState`).
    """

    SIGNED: ClassVar[bool] = True

    name: str | None = Field(default=None, pattern=_NAME)
    session: str | None = Field(default=None, pattern=r"^[0-9a-f]{1,32}$")
    state: Literal["online", "loading", "ready", "error", "offline"]
    plan_id: str | None = None
    detail: str | None = None


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


class PredictedCost(Message):
    """An agent's predicted share of the token latency, ms summed over the k rounds."""

    compute_ms: float
    disk_ms: float
    hop_ms: float


class PlanAgent(Message):
    """An agent's place in the ring."""

    name: str = Field(pattern=_NAME)
    host: str
    data_port: int = Field(ge=1, le=65535)
    windows: list[WindowAssignment]
    mode: Literal["resident", "overflow", "stream"] | None = None
    predicted: PredictedCost | None = None
    release: bool = Field(default=False, description="drop each window from the page cache after use "
                                                      "(the planner's choice for devices in stream mode with k > 1)")
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
    n_parallel: int = Field(ge=1, le=256, default=1, description="sequences every window's KV cache holds "
                                                                 "(requests served at once), n_ctx each")
    planner: str
    k: int = Field(ge=1, default=1, description="rounds: windows per agent")
    predicted_ms_per_token: float | None = None
    solve_ms: float | None = None
    dropped: list[str] = Field(default_factory=list, description="agents the planner left out")
    pipeline_depth: int | None = Field(
        default=None, ge=1, description="ring devices that can compute at once (agents sharing a host share its "
        "cores); the head spreads requests over this many groups [default: every agent of the ring]")
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

    probe_id: str = Field(pattern=_NAME)
    host: str
    port: int = Field(ge=1, le=65535)


class LinkReport(Message):
    """An agent's answer to :class:`LinkProbe`: one-way latency (ms) and bandwidth (Mbit/s)."""

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    probe_id: str = Field(pattern=_NAME)
    link_ms: float = Field(ge=0, default=0.0)
    link_mbps: float = Field(ge=0, default=0.0)
    error: str | None = None


class ChatMessage(Message):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(Message):
    """Sampling settings; temperature <= 0 means greedy.

    The defaults are llama.cpp's (llama-server's and ``llama-cli``'s): temperature
    0.8, top_k 40, top_p 0.95, min_p 0.05. Every API fills in these when a client
    sends no value, so small models do not ramble on a flat distribution.
    """

    max_tokens: int = Field(ge=1, le=1 << 20, default=256)
    temperature: float = Field(ge=0.0, le=10.0, default=0.8)
    top_k: int = Field(ge=0, default=40)
    top_p: float = Field(gt=0.0, le=1.0, default=0.95)
    min_p: float = Field(ge=0.0, le=1.0, default=0.05, description="drop tokens whose probability is below "
                                                                   "min_p times the most likely one's")
    seed: int | None = Field(ge=0, le=2**32 - 1, default=None)
    presence_penalty: float = Field(ge=-2.0, le=2.0, default=0.0, description="OpenAI's: subtracted once "
                                                                             "from every token already generated")
    frequency_penalty: float = Field(ge=-2.0, le=2.0, default=0.0, description="OpenAI's: subtracted per "
                                                                               "occurrence of a generated token")
    stop: list[str] = Field(default_factory=list, max_length=4, description="end the answer before the first "
                                                                              "of these strings (not included)")
    ignore_eos: bool = Field(default=False, description="generate max_tokens even past end-of-generation "
                                                        "tokens (benchmarks)")


class GenerateRequest(Message):
    """A user's request to the controller: chat messages, a raw prompt, or prompt token ids (exactly one)."""

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str = Field(pattern=_NAME)
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = Field(default=None, description="the prompt, already tokenized")
    sampling: Sampling = Sampling()


class GenerateJob(Message):
    """The controller's order to the head: generate from these token ids in KV sequence ``seq_id``.

    The controller gives each request in flight its own sequence (0 …
    ``Plan.n_parallel`` - 1), so requests share the ring and every window's KV cache.
    """

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str = Field(pattern=_NAME)
    plan_id: str
    seq_id: int = Field(ge=0, default=0)
    prompt_token_ids: list[int] = Field(min_length=1)
    sampling: Sampling
    attempt: int = Field(ge=0, default=0, description="0, then +1 each time the request resumes on a new ring")
    resume_token_ids: list[int] = Field(
        default_factory=list, description="tokens already streamed to the client by an earlier attempt: the head "
        "replays prompt + these through the ring to rebuild the KV caches, then goes on generating")


class StreamEvent(Message):
    """One event of a request's stream: a text delta, the end, an error, or an interruption.

    ``interrupted`` (head → controller) says the ring broke (an agent was
    lost, or the controller re-planned) after the tokens in ``token_ids``
    were streamed; the controller then resumes the request on the new ring
    (a :class:`GenerateJob` with ``resume_token_ids``), and the client's
    stream goes on from there. ``index`` numbers an attempt's events 0, 1, …
    so that a receiver drops duplicates after a :class:`StreamReplay`.
    """

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str
    type: Literal["token", "done", "error", "interrupted"]
    attempt: int = 0
    index: int | None = None
    text: str = ""
    token_id: int | None = None
    # done only
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    ttft_ms: float | None = None
    ms_per_token: float | None = None
    # error only
    error: str | None = None


class ControllerStatus(Message):
    """The controller's state (retained; last-will ``offline``)."""

    SIGNED: ClassVar[bool] = True

    state: Literal["waiting", "planning", "ready", "offline", "error"]
    model: str | None = None
    model_path: str | None = Field(default=None, description="agents that have this file (same fingerprint) "
                                                             "profile and slice it themselves")
    model_fingerprint: str | None = None
    n_ctx: int | None = None
    plan_id: str | None = None
    detail: str | None = None
    api: str | None = Field(default=None, description="the OpenAI-compatible API's base URL, when served; "
                                                      "it also serves the window files")
    model_facts: ModelFacts | None = Field(default=None, description="the model's shape: agents without the "
                                                                     "model file profile from it")


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

    name: str = Field(pattern=_NAME)
    plan_id: str | None = None
    layers: int = Field(ge=0, default=0, description="layers held, summed over the windows")
    windows: list[WindowStats] = Field(default_factory=list)
    tokens_generated: int = Field(ge=0, default=0, description="head only: tokens sampled since start")
    tokens_per_s: float = Field(ge=0, default=0.0, description="head: tokens sampled per second in its most "
                                                                "recent run of work (the answer now, or the "
                                                                "last one); others: rows computed")
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


class CancelJob(Message):
    """The controller asks the head to stop a request.

    Its client went away: the head ends the stream with ``done`` and
    ``finish_reason = "cancelled"``. Or (``interrupt``) the ring lost an
    agent: the head ends it with ``interrupted`` and the tokens so far, and
    the controller resumes it elsewhere. Either way the sequence is freed.
    """

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str = Field(pattern=_NAME)
    interrupt: bool = False


class StreamReplay(Message):
    """The controller asks the head to publish again a request's events from ``from_index`` on.

    Sent after the controller reconnects to the broker: events the head
    published while the controller was away were lost (stream events are not
    retained). The head keeps the events of its recent requests.
    """

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str = Field(pattern=_NAME)
    attempt: int = 0
    from_index: int = Field(ge=0, default=0)


# ------------------------------------------------------------------ data plane

class FrameKind(IntEnum):
    FORWARD = 1    # run the next window on this payload
    KV_REMOVE = 2  # drop positions >= pos of seq_id in every window, then pass on
    ERROR = 3      # a window failed; payload is a UTF-8 message; goes on to the head
    PING = 4       # link probe: the receiver answers PONG on the same connection
    PONG = 5       # answer to PING (no payload)
    HELLO = 6      # first frame on a ring link: request_id = the sender's plan tag (Plan.tag)


class DType(IntEnum):
    TOKENS = 1  # int32 token ids, n_tokens of them
    F32 = 2     # float32 hidden states, n_tokens × n_embd
    TEXT = 3    # UTF-8 bytes (errors)
    NONE = 4    # no payload
    BYTES = 5   # opaque bytes (PING padding), n_tokens = 0


FLAG_MORE = 0x01
"""Header flag: another frame of the same group follows; the receiver runs the group as one batch."""

FRAME_MAGIC = b"HRNG"
FRAME_VERSION = 1
HEADER = struct.Struct("<4sBBBBIIHHIIII")
"""magic, version, kind, dtype, flags, request id, seq id, round, reserved (0),
pos, n_tokens, n_embd, payload bytes — 36 bytes."""
MAX_TOKENS_PER_FRAME = 1 << 16  # the controller's --batch is at most this
MAX_EMBD = 1 << 15  # widest hidden state, floats (the largest open models have 16384)
MAX_PAYLOAD = 256 << 20  # largest payload, bytes: n_batch × n_embd × 4 (e.g. 8192 tokens × 8192 floats)
MAX_PROBE_BYTES = 1 << 24  # largest PING padding
MAX_ERROR_BYTES = 4096  # largest ERROR message
MAX_SEQUENCES = 256  # KV sequences a plan may have (Plan.n_parallel)
MAX_POS = (1 << 31) - 1  # llama.cpp positions are int32

_DTYPES = {  # the payload types each frame kind may carry
    FrameKind.FORWARD: (DType.TOKENS, DType.F32),
    FrameKind.KV_REMOVE: (DType.NONE,),
    FrameKind.ERROR: (DType.TEXT,),
    FrameKind.PING: (DType.NONE, DType.BYTES),
    FrameKind.PONG: (DType.NONE,),
    FrameKind.HELLO: (DType.NONE,),
}
DTYPE_SIZE = {DType.TOKENS: 4, DType.F32: 4}  # bytes per element

LINK_MAGIC = b"HRNA"
LINK_ACCEPT_MAGIC = b"HRNO"
LINK_VERSION = 1
LINK_MODE_OPEN = 0  # no cluster key: MACs are zero and not checked
LINK_MODE_KEYED = 1  # HMAC-SHA256 with the cluster key
LINK_NONCE_BYTES = 32
LINK_HELLO = struct.Struct("<4sBB32s")
"""Handshake, server → client: magic, version, mode, nonce_s — 38 bytes."""
LINK_REPLY = struct.Struct("<4sBB32s32s")
"""Handshake, client → server: magic, version, mode, nonce_c, mac_c — 70 bytes."""
LINK_ACCEPT = struct.Struct("<4s32s")
"""Handshake, server → client: accept magic, mac_s — 36 bytes."""
LINK_CLIENT_LABEL = b"homering-link-client"
LINK_SERVER_LABEL = b"homering-link-server"
LINK_HANDSHAKE_TIMEOUT_S = 5.0


class FrameError(ValueError):
    """A frame that fails validation; the receiver drops the connection."""


class HandshakeError(ConnectionError):
    """A data-plane link whose handshake failed (another cluster key, no key on one end, a timeout, or
    garbage); both ends hang up."""


@dataclass(frozen=True)
class FrameHeader:
    """A frame's header (see :data:`HEADER`); ``payload_len`` bytes of payload follow it."""

    kind: FrameKind
    dtype: DType
    request_id: int
    seq_id: int
    round: int
    pos: int
    n_tokens: int
    n_embd: int
    payload_len: int
    flags: int = 0  # FLAG_MORE

    @property
    def more(self) -> bool:
        return bool(self.flags & FLAG_MORE)

    def pack(self) -> bytes:
        return HEADER.pack(FRAME_MAGIC, FRAME_VERSION, self.kind, self.dtype, self.flags, self.request_id,
                           self.seq_id, self.round, 0, self.pos, self.n_tokens, self.n_embd,
                           self.payload_len)

    @classmethod
    def unpack(cls, raw: bytes) -> "FrameHeader":
        """Parse and validate a header (before any payload is read).

        Checks: magic, version, known kind and dtype and their pairing, flags,
        the reserved field, ``seq_id < MAX_SEQUENCES``, positions within int32,
        shape bounds (``1 ≤ n_tokens ≤ MAX_TOKENS_PER_FRAME`` and, for hidden
        states, ``1 ≤ n_embd ≤ MAX_EMBD``; 0 and 0 for other payloads), and that
        ``payload_len`` is exactly ``n_tokens × 4`` (tokens), ``n_tokens × n_embd × 4``
        (hidden states), 0 (none), at most :data:`MAX_ERROR_BYTES` (text) or
        :data:`MAX_PROBE_BYTES` (PING padding), and at most :data:`MAX_PAYLOAD`.

        Raises:
            FrameError: any check fails.
        """
        if len(raw) != HEADER.size:
            raise FrameError(f"short header ({len(raw)} bytes)")
        (magic, version, kind, dtype, flags, request_id, seq_id, rnd, reserved, pos, n_tokens, n_embd,
         payload_len) = HEADER.unpack(raw)
        if magic != FRAME_MAGIC:
            raise FrameError(f"bad magic {magic!r}")
        if version != FRAME_VERSION:
            raise FrameError(f"unsupported frame version {version}")
        try:
            kind, dtype = FrameKind(kind), DType(dtype)
        except ValueError as exc:
            raise FrameError(str(exc)) from None
        if dtype not in _DTYPES[kind]:
            raise FrameError(f"a {kind.name} frame cannot carry {dtype.name}")
        if flags & ~FLAG_MORE or (flags and kind in (FrameKind.PING, FrameKind.PONG)):
            raise FrameError(f"bad flags {flags:#x} on a {kind.name} frame")
        if reserved:
            raise FrameError(f"reserved header field is {reserved}")
        if seq_id >= MAX_SEQUENCES:
            raise FrameError(f"sequence {seq_id} (at most {MAX_SEQUENCES - 1})")
        if payload_len > MAX_PAYLOAD:
            raise FrameError(f"frame too large ({payload_len} bytes, at most {MAX_PAYLOAD})")
        if dtype in DTYPE_SIZE:
            if n_tokens > MAX_TOKENS_PER_FRAME or n_embd > MAX_EMBD:
                raise FrameError(f"frame too large ({n_tokens} tokens of {n_embd} floats; at most "
                                 f"{MAX_TOKENS_PER_FRAME} of {MAX_EMBD})")
            if n_tokens == 0 or (dtype is DType.F32 and n_embd == 0):
                raise FrameError(f"an empty {dtype.name} frame ({n_tokens} × {n_embd})")
            if dtype is DType.TOKENS and n_embd:
                raise FrameError(f"a token frame with n_embd = {n_embd}")
            expected = n_tokens * (n_embd or 1) * DTYPE_SIZE[dtype]
            if payload_len != expected:
                raise FrameError(f"payload is {payload_len} bytes, header says {expected}")
            if pos > MAX_POS - n_tokens:
                raise FrameError(f"positions {pos} + {n_tokens} beyond int32")
        else:
            if n_tokens or n_embd:
                raise FrameError(f"a {dtype.name} frame with a shape ({n_tokens} × {n_embd})")
            limit = {DType.NONE: 0, DType.TEXT: MAX_ERROR_BYTES, DType.BYTES: MAX_PROBE_BYTES}[dtype]
            if payload_len > limit:
                raise FrameError(f"{payload_len} bytes of {dtype.name} on a {kind.name} frame (at most {limit})")
            if pos > MAX_POS:
                raise FrameError(f"position {pos} beyond int32")
        return cls(kind, dtype, request_id, seq_id, rnd, pos, n_tokens, n_embd, payload_len, flags)

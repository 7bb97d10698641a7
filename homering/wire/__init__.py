"""The wire format: every MQTT topic and message, the binary data-plane frame, and the link handshake.

This package is the only place the wire format is defined: :mod:`.topics` (names, built and
parsed), :mod:`.base` (the message base and its signature), :mod:`.messages` (cluster state),
:mod:`.requests` (requests and streams), :mod:`.codec` (encode/decode with the cluster key),
:mod:`.frames` (data-plane frames), :mod:`.handshake` (the link handshake), :mod:`.security`
(the cluster key and the replay checks). It imports nothing from the runtime above it.

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

Signed messages. With a cluster key (:mod:`homering.wire.security`) every
message that changes what a client sees or what a process does is signed
(``Message.SIGNED``; :class:`~homering.wire.codec.Codec` signs and checks): :class:`Plan`,
:class:`ControllerStatus`, :class:`ControllerStats`, :class:`GenerateJob`, :class:`CancelJob`,
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
must also be within :data:`~homering.wire.security.MAX_AGE_S` of the
receiver's clock and not seen before. An agent's retained state (profile,
status, stats) names the agent in its body, and a receiver keeps only the
newest per agent (:class:`~homering.wire.security.NewestState`): an old
copy replayed later, or one agent's message on another's topic, is dropped.
Receivers without a key drop signed ones.

Data plane (TCP between ring neighbours, TCP_NODELAY). First a handshake, in
which both ends prove they hold the same cluster key (HMAC-SHA256
challenge–response, fresh nonces from both sides, so a recorded handshake
cannot be replayed; :mod:`.handshake`), then frames (:mod:`.frames`: a fixed
header, a payload of token ids, hidden states or text, and their limits).

Window distribution (HTTP, on the controller's API server, same API key as
the API; see :mod:`homering.transport.windows`):

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

from homering.engine.drafting import GAMMA_MAX, Speculative
from homering.engine.sampling import Sampling
from homering.profiler.profile import DeviceProfile, GpuProfile, OsName
from homering.wire.base import NAME, SCHEMA_VERSION, BadSignature, MalformedMessage, Message, MissingKey
from homering.wire.codec import Codec
from homering.wire.frames import (
    FLAG_MORE,
    FLAG_ROWS,
    HEADER,
    MAX_PAYLOAD,
    DType,
    Frame,
    FrameError,
    FrameHeader,
    FrameKind,
)
from homering.wire.handshake import HandshakeError
from homering.wire.messages import (
    LIVE_AGENT_STATES,
    SHA256,
    WINDOWS_PATH,
    AgentProfile,
    AgentState,
    AgentStats,
    AgentStatus,
    ControllerState,
    ControllerStats,
    ControllerStatus,
    LinkProbe,
    LinkReport,
    ModelFacts,
    Plan,
    PlanAgent,
    PredictedCost,
    WindowAssignment,
    WindowFile,
    WindowRole,
    WindowStats,
)
from homering.wire.requests import (
    END_EVENTS,
    CancelJob,
    ChatMessage,
    EventType,
    GenerateJob,
    GenerateRequest,
    StreamEvent,
    StreamReplay,
    TokenLogprob,
)
from homering.wire.security import ClusterKey, NewestState
from homering.wire.topics import PREFIX, TopicRef, Topics, parse

__all__ = [
    "NAME",
    "SCHEMA_VERSION",
    "PREFIX",
    "SHA256",
    "WINDOWS_PATH",
    "FLAG_MORE",
    "FLAG_ROWS",
    "HEADER",
    "MAX_PAYLOAD",
    "AgentProfile",
    "AgentStats",
    "AgentStatus",
    "BadSignature",
    "CancelJob",
    "ChatMessage",
    "ClusterKey",
    "Codec",
    "ControllerStats",
    "ControllerStatus",
    "DType",
    "DeviceProfile",
    "Frame",
    "FrameError",
    "FrameHeader",
    "FrameKind",
    "GenerateJob",
    "GenerateRequest",
    "GpuProfile",
    "HandshakeError",
    "LinkProbe",
    "LinkReport",
    "MalformedMessage",
    "Message",
    "MissingKey",
    "ModelFacts",
    "NewestState",
    "OsName",
    "Plan",
    "PlanAgent",
    "PredictedCost",
    "Sampling",
    "Speculative",
    "GAMMA_MAX",
    "StreamEvent",
    "StreamReplay",
    "TokenLogprob",
    "TopicRef",
    "Topics",
    "WindowAssignment",
    "WindowFile",
    "WindowRole",
    "WindowStats",
    "parse",
    "AgentState",
    "ControllerState",
    "EventType",
    "END_EVENTS",
    "LIVE_AGENT_STATES",
]

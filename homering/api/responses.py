"""The response shapes of the API, for its OpenAPI document (``/openapi.json``).

Documentation only: the routes build their answers as dicts, and these models describe them, with the error
object every route may answer and the server-sent events of the streams.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from homering.wire import AgentStats, DeviceProfile, PredictedCost, WindowAssignment


class ErrorObject(BaseModel):
    """An error's message, its type (``invalid_request_error``, …), the field it is about and a code."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error: ``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers them."""

    error: ErrorObject


FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    """Tokens of the prompt and of the answer."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class _Function(BaseModel):
    name: str
    arguments: str = Field(description="a JSON text")


class _ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: _Function


class _AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is tool calls")
    tool_calls: list[_ToolCall] | None = None


class _TopLogprob(BaseModel):
    token: str
    logprob: float = Field(le=0)
    bytes: list[int]


class _TokenLogprob(_TopLogprob):
    top_logprobs: list[_TopLogprob]


class _ChatLogprobs(BaseModel):
    content: list[_TokenLogprob]
    refusal: None


class _CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class _ChatChoice(BaseModel):
    index: int = Field(ge=0)
    finish_reason: FinishReason
    logprobs: _ChatLogprobs | None = Field(description="with logprobs: true")
    message: _AssistantMessage


class ChatCompletion(BaseModel):
    """A chat completion (``POST /v1/chat/completions`` without ``stream``)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[_ChatChoice]
    usage: Usage
    system_fingerprint: str | None


class _CompletionChoice(BaseModel):
    index: int = Field(ge=0)
    finish_reason: FinishReason
    logprobs: _CompletionLogprobs | None = Field(description="with logprobs: n")
    text: str


class Completion(BaseModel):
    """A completion (``POST /v1/completions`` without ``stream``)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[_CompletionChoice]
    usage: Usage
    system_fingerprint: str | None


class _DeltaFunction(TypedDict, total=False):
    name: str  # in a call's first chunk
    arguments: str


class _DeltaToolCall(TypedDict, total=False):
    index: int
    id: str  # in a call's first chunk
    type: Literal["function"]
    function: _DeltaFunction


class _ChatDelta(TypedDict, total=False):
    role: Literal["assistant"]  # in the first chunk only
    content: str  # absent in the last chunk
    tool_calls: list[_DeltaToolCall]


class _ChatChunkChoice(BaseModel):
    index: int = Field(ge=0)
    finish_reason: FinishReason | None
    logprobs: _ChatLogprobs | None
    delta: _ChatDelta


class ChatCompletionChunk(BaseModel):
    """One event of a streamed chat completion; with ``include_usage`` a last one has no choices, only usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[_ChatChunkChoice]
    usage: Usage | None = Field(default=None, description="with stream_options.include_usage: null but in the last")


class _CompletionChunkChoice(BaseModel):
    index: int = Field(ge=0)
    finish_reason: FinishReason | None
    logprobs: _CompletionLogprobs | None
    text: str


class CompletionChunk(BaseModel):
    """One event of a streamed completion; with ``include_usage`` a last one has no choices, only usage."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[_CompletionChunkChoice]
    usage: Usage | None = Field(default=None, description="with stream_options.include_usage: null but in the last")


class ModelCard(BaseModel):
    """The served model (``GET /v1/models/{name}``); ``aliases``: its other names, which requests may use too
    (:func:`homering.api.names.model_aliases`)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    aliases: list[str] = []


class ModelList(BaseModel):
    """``GET /v1/models``: the one served model."""

    object: Literal["list"]
    data: list[ModelCard]


class _ClusterAgent(BaseModel):
    name: str
    host: str
    pid: int
    data_port: int
    status: str = Field(description="the agent's last status, 'unknown' before its first")
    live: bool = Field(
        description="its heartbeat goes on and its status is not offline or error: false for an agent that was "
        "killed or lost its connection (listed still, with its last status, until the controller restarts)"
    )
    head: bool
    in_plan: bool
    windows: list[WindowAssignment]
    mode: str | None
    predicted: PredictedCost | None = Field(
        default=None, description="the plan's predicted ms per token on this device: compute, disk and hop"
    )
    profile: DeviceProfile | None
    link_ms: float | None
    link_mbps: float | None
    stats: AgentStats | None


class _ClusterPlan(BaseModel):
    plan_id: str
    planner: str
    k: int
    n_layers: int
    ring: list[str]
    dropped: list[str]
    head: str
    predicted_ms_per_token: float | None
    measured_ms_per_token: float | None


class ClusterReport(BaseModel):
    """``GET /v1/cluster``: the agents, the plan (predicted and measured ms/token) and the broker."""

    model: str
    state: str
    broker: str
    n_ctx: int
    n_parallel: int
    requests_in_flight: int = Field(ge=0)
    queue_depth: int = Field(ge=0)
    agents: list[_ClusterAgent]
    plan: _ClusterPlan | None


class Health(BaseModel):
    """``GET /health``: 200 with ``ok``; 503 with ``degraded`` and the ``reason``."""

    status: Literal["ok", "degraded"]
    reason: str | None = Field(description="why requests cannot be served now (degraded only)")
    state: str = Field(description="the controller's state: waiting, planning, ready or error")
    model: str
    agents: int = Field(ge=0, description="live agents")
    plan_id: str | None
    sequences: int = Field(ge=1, description="KV sequences: requests served at once")
    sequences_busy: int = Field(ge=0)
    queue_depth: int = Field(ge=0, description="requests waiting for a sequence")
    busy_s: float | None = Field(description="how long no sequence has been free, s (null: one is free)")
    predicted_request_s: float | None = Field(
        description="how long a request is predicted to take: the plan's ms/token times the default max_tokens"
    )


def sse_event(chunk: type[BaseModel]) -> dict:
    """One server-sent event of a stream (OpenAPI 3.1: a text/event-stream ``schema`` describes each event):
    ``data`` is a JSON ``chunk``, an error object (the cluster failed mid-answer; ``[DONE]`` follows), or ``[DONE]``."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {
            "oneOf": [
                {"$ref": f"#/components/schemas/{chunk.__name__}"},
                {"$ref": "#/components/schemas/ErrorResponse"},
            ]
        },
    }
    return {
        "type": "object",
        "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]", "description": "the last event"}, json_data]}},
    }


def error(description: str) -> dict:
    """A route's ``responses`` entry for an error status: the error object, with ``description``."""
    return {"model": ErrorResponse, "description": description}


def generation_responses(answer: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """The ``responses`` of a generation route: ``answer`` (or, streamed, ``chunk`` events) and its errors."""
    return {
        200: {
            "model": answer,
            "description": "the answer; with `stream`, server-sent events: one chunk per "
            "text delta, then `data: [DONE]`",
            "content": {"text/event-stream": {"schema": sse_event(chunk)}},
        },
        400: error("a malformed request (invalid JSON, a field's type or range, max_tokens over the context)"),
        404: error("this cluster does not serve the model"),
        413: error("the prompt does not fit the context"),
        429: error("every sequence is busy and the queue is full"),
        500: error("the cluster failed the request"),
        503: error("no plan is ready (the agents are joining, loading or re-planning)"),
    }


STREAM_CHUNKS = (ChatCompletionChunk, CompletionChunk)
"""Models only the streams' events refer to: the document adds them to its components."""

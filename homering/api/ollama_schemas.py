"""The Ollama API's request bodies (``/api/chat``, ``/api/generate``, ``/api/embed``, ``/api/show``) and their
translation into OpenAI request bodies (:mod:`homering.api.schemas`'s field names).

Shapes after Ollama's API reference (docs/api.md) and its Python client's types. ``options`` maps onto the
OpenAI sampling fields (``num_predict`` is ``max_tokens``; -1 and -2 leave it to the server's default);
options this server has no use for (``num_ctx``, ``num_thread``, ``mirostat`` …) are accepted and ignored,
as ``keep_alive`` is: the cluster keeps its model loaded. ``format`` is ``"json"`` (OpenAI's
``response_format`` ``json_object``) or a JSON schema (``json_schema``, strict); ``tools`` have OpenAI's
shape already; a ``tool`` message answers the assistant's call of the function named ``tool_name``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from homering.api.errors import ApiError

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty")


class _Open(BaseModel):
    # fields this server has no use for are accepted (Ollama clients send many)
    model_config = ConfigDict(extra="allow")


class Options(_Open):
    """Ollama's ``options``: those that map onto sampling; others are ignored."""

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    num_predict: int | None = Field(default=None, ge=-2, description="-1: no limit, -2: fill the context")
    stop: list[str] | None = Field(default=None, max_length=4)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)


class _ToolFunction(_Open):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class _ToolCall(_Open):
    function: _ToolFunction


class OllamaMessage(_Open):
    """A chat message; ``images`` are refused (the served models read text only)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_name: str | None = None


class _Generation(_Open):
    model: str = Field(min_length=1)
    stream: bool = True  # Ollama streams unless told not to
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None


class ChatBody(_Generation):
    """``POST /api/chat``."""

    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateBody(_Generation):
    """``POST /api/generate``: an empty ``prompt`` only loads the model (``done_reason`` ``load``)."""

    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    raw: bool = False
    images: list[str] | None = None


class EmbedBody(_Open):
    """``POST /api/embed``."""

    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)
    options: Options | None = None
    keep_alive: float | str | None = None


class ShowBody(_Open):
    """``POST /api/show`` (older clients send ``name``)."""

    model: str | None = None
    name: str | None = None
    verbose: bool = False

    def model_name(self) -> str:
        """The model asked for.

        Raises:
            ApiError: 400, neither ``model`` nor ``name`` is given.
        """
        if not (self.model or self.name):
            raise ApiError(400, "model: the model name is required", param="model")
        return str(self.model or self.name)


def model_name(name: str) -> str:
    """An Ollama model name as the OpenAI routes take it: Ollama's default tag ``:latest`` dropped."""
    return name.removesuffix(":latest")


def sampling_fields(options: Options | None) -> dict[str, Any]:
    """``options`` as OpenAI body fields (``max_tokens``, ``temperature``, ``stop`` …); unset ones left out."""
    if options is None:
        return {}
    out = {f: v for f in _SAMPLING if (v := getattr(options, f)) is not None}
    if options.num_predict is not None and options.num_predict > 0:
        out["max_tokens"] = options.num_predict
    if options.stop:
        out["stop"] = list(options.stop)
    return out


def response_format(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """Ollama's ``format`` as OpenAI's ``response_format``: ``"json"`` is ``json_object``; a JSON schema is a
    strict ``json_schema``; empty or None is none."""
    if not fmt:
        return None
    if fmt == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "ollama_format", "schema": fmt, "strict": True}}


def _call_id(i: int) -> str:
    return f"call_{i}"


def _assistant(m: OllamaMessage, calls: list[tuple[str, str]]) -> dict[str, Any]:
    """An assistant message; its tool calls get ids (remembered in ``calls`` as ``(id, name)``)."""
    out: dict[str, Any] = {"role": "assistant", "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = []
        for tc in m.tool_calls:
            cid = _call_id(len(calls))
            calls.append((cid, tc.function.name))
            args = json.dumps(tc.function.arguments)
            out["tool_calls"].append(
                {"id": cid, "type": "function", "function": {"name": tc.function.name, "arguments": args}}
            )
    return out


def _tool_result(m: OllamaMessage, calls: list[tuple[str, str]], index: int) -> dict[str, Any]:
    """A ``tool`` message, tied to the latest call of the function ``tool_name`` (else the latest call)."""
    named = [cid for cid, name in calls if m.tool_name is None or name == m.tool_name]
    if not named:
        raise ApiError(400, f"messages.{index}: a tool result without a tool call before it", param=f"messages.{index}")
    return {"role": "tool", "content": m.content, "tool_call_id": named[-1]}


def openai_messages(messages: list[OllamaMessage]) -> list[dict[str, Any]]:
    """Ollama chat messages as OpenAI's: tool calls get ids, tool results refer to them.

    Raises:
        ApiError: 400, a message has images, or a tool result has no call before it.
    """
    out: list[dict[str, Any]] = []
    calls: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if m.images:
            raise ApiError(400, f"messages.{i}.images: this model reads text only", param=f"messages.{i}.images")
        if m.role == "assistant":
            out.append(_assistant(m, calls))
        elif m.role == "tool":
            out.append(_tool_result(m, calls, i))
        else:
            out.append({"role": m.role, "content": m.content})
    return out


def chat_request(body: ChatBody) -> dict[str, Any]:
    """``/api/chat``'s body as a ``/v1/chat/completions`` body (streamed with usage when ``stream``).

    Raises:
        ApiError: 400, no messages, or see :func:`openai_messages`.
    """
    if not body.messages:
        raise ApiError(400, "messages: at least one message is required", param="messages")
    out = _common(body)
    out["messages"] = openai_messages(body.messages)
    if body.tools:
        out["tools"] = body.tools
    return out


def generate_request(body: GenerateBody) -> tuple[str, dict[str, Any]]:
    """``/api/generate``'s body as ``(OpenAI path, body)``: a chat completion of ``system`` and ``prompt``
    (the model's chat template applies, as in Ollama), or with ``raw`` a completion of the prompt as it is.

    Raises:
        ApiError: 400, images were sent.
    """
    if body.images:
        raise ApiError(400, "images: this model reads text only", param="images")
    out = _common(body)
    if body.raw:
        return "/v1/completions", out | {"prompt": body.prompt or ""}
    system = [{"role": "system", "content": body.system}] if body.system else []
    return "/v1/chat/completions", out | {"messages": [*system, {"role": "user", "content": body.prompt or ""}]}


def _common(body: _Generation) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model_name(body.model), "stream": body.stream, **sampling_fields(body.options)}
    if body.stream:
        out["stream_options"] = {"include_usage": True}
    if (rf := response_format(body.format)) is not None:
        out["response_format"] = rf
    return out


def embed_request(body: EmbedBody) -> dict[str, Any]:
    """``/api/embed``'s body as a ``/v1/embeddings`` body."""
    out: dict[str, Any] = {"model": model_name(body.model), "input": body.input}
    if body.dimensions is not None:
        out["dimensions"] = body.dimensions
    return out

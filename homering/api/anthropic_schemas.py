"""The Anthropic Messages API's request body (``POST /v1/messages``) and its translation into an OpenAI chat
completion body (:mod:`homering.api.schemas`'s field names).

Shapes after Anthropic's Messages API reference: ``system`` (a string or text blocks), ``messages`` whose
content is a string or blocks (``text``, ``tool_use``, ``tool_result``; images are refused: the served models
read text only), ``stop_sequences``, ``temperature`` (0 to 1), ``top_p``, ``top_k``, ``tools`` (``name``,
``description``, ``input_schema``) and ``tool_choice``. A ``tool_use`` block is an OpenAI assistant tool
call (its ``input`` the JSON ``arguments``); a ``tool_result`` block is an OpenAI ``tool`` message.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from homering.api.errors import ApiError

PARAMS = {"stop": "stop_sequences", "max_completion_tokens": "max_tokens"}
"""OpenAI field names that differ from this API's: an OpenAI error about ``stop`` is about ``stop_sequences``."""


class _Open(BaseModel):
    # fields this server has no use for (metadata, service_tier, thinking …) are accepted and ignored
    model_config = ConfigDict(extra="allow")


class Block(_Open):
    """A content block: ``text``, ``tool_use`` (``id``, ``name``, ``input``) or ``tool_result``
    (``tool_use_id``, ``content``, ``is_error``); others (``image`` …) get a 400."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool = False


class AnthropicMessage(_Open):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Open):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None


class MessagesBody(_Open):
    """``POST /v1/messages``."""

    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


def _text(content: str | list[Block] | None, where: str) -> str:
    """The text of a string or of text blocks.

    Raises:
        ApiError: 400, a block that is not text (named by ``where``).
    """
    if content is None or isinstance(content, str):
        return content or ""
    for i, b in enumerate(content):
        if b.type != "text":
            raise ApiError(400, f"{where}.{i}.type: '{b.type}' blocks are not supported here", param=f"{where}.{i}")
    return "".join(b.text or "" for b in content)


def _user(m: AnthropicMessage, where: str) -> list[dict[str, Any]]:
    """A user message as OpenAI messages: a ``tool`` message per ``tool_result`` block, then its text."""
    if isinstance(m.content, str):
        return [{"role": "user", "content": m.content}]
    out: list[dict[str, Any]] = []
    texts = []
    for i, b in enumerate(m.content):
        if b.type == "tool_result":
            content = _text(b.content, f"{where}.content.{i}.content")
            out.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": content})
        else:
            texts.append(b)
    if texts or not out:
        out.append({"role": "user", "content": _text(texts, f"{where}.content")})
    return out


def _assistant(m: AnthropicMessage, where: str) -> dict[str, Any]:
    """An assistant message as OpenAI's: its text, and its ``tool_use`` blocks as tool calls."""
    if isinstance(m.content, str):
        return {"role": "assistant", "content": m.content}
    uses = [b for b in m.content if b.type == "tool_use"]
    out: dict[str, Any] = {"role": "assistant", "content": _text([b for b in m.content if b.type != "tool_use"], where)}
    if uses:
        out["tool_calls"] = [
            {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input or {})}}
            for b in uses
        ]
    return out


def _tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.type == "tool":
        if not choice.name:
            raise ApiError(400, "tool_choice.name: required when tool_choice.type is 'tool'", param="tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def openai_request(body: MessagesBody) -> dict[str, Any]:
    """The body as a ``/v1/chat/completions`` body (streamed with usage when ``stream``).

    Raises:
        ApiError: 400, a block this server does not take (an image), or a ``tool`` choice without a name.
    """
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _text(body.system, "system")})
    for i, m in enumerate(body.messages):
        where = f"messages.{i}"
        messages.extend(_user(m, where) if m.role == "user" else [_assistant(m, f"{where}.content")])
    out: dict[str, Any] = {"model": body.model, "max_tokens": body.max_tokens, "messages": messages}
    out |= {f: v for f in ("temperature", "top_p", "top_k") if (v := getattr(body, f)) is not None}
    if body.stop_sequences:
        out["stop"] = body.stop_sequences
    if body.stream:
        out |= {"stream": True, "stream_options": {"include_usage": True}}
    if body.tools:
        out["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
            }
            for t in body.tools
        ]
    if body.tool_choice is not None:
        out["tool_choice"] = _tool_choice(body.tool_choice)
    return out

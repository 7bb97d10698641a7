"""``POST /v1/responses``: the basics of OpenAI's Responses API, over the chat machinery.

A request's ``instructions`` and ``input`` (a string, or messages whose content is a string or ``input_text``
parts) become a chat (:class:`~homering.api.schemas.ChatCompletionBody`); ``max_output_tokens``,
``temperature``, ``top_p`` and ``text.format`` (``text``, ``json_object``, ``json_schema``: enforced by a
grammar, as ``response_format``) map to their chat fields. The answer is a ``response`` object with one
``message`` output item of one ``output_text`` part; ``status`` is ``incomplete`` (``max_output_tokens``) when
the answer was cut. With ``stream``: the events ``response.created``, ``response.in_progress``,
``response.output_item.added``, ``response.content_part.added``, one ``response.output_text.delta`` per text
delta, ``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done`` and
``response.completed`` (or ``response.incomplete``; a cluster failure is ``error``). Not supported: tools,
``previous_response_id`` (nothing is stored), images and files (400).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from homering.api.answer import ChoiceText, admitted, unless_disconnected, usage
from homering.api.errors import ApiError
from homering.api.openai import chat_requests
from homering.api.schemas import ChatCompletionBody
from homering.api.view import ClusterView
from homering.wire import EventType, StreamEvent


class ResponsesBody(BaseModel):
    """``POST /v1/responses``: what this server reads of it (other fields are accepted and ignored)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: dict[str, Any] | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    previous_response_id: str | None = None

    def chat(self) -> ChatCompletionBody:
        """The request as a chat completion request.

        Raises:
            ApiError: 400 with ``param``: a non-text input, tools, ``previous_response_id``, a bad ``text.format``.
        """
        if self.tools:
            raise ApiError(400, "tools: not supported on /v1/responses; use /v1/chat/completions", param="tools")
        if self.previous_response_id:
            raise ApiError(400, "previous_response_id: responses are not stored", param="previous_response_id")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            if item.get("type", "message") != "message" or item.get("role") not in (
                "system",
                "developer",
                "user",
                "assistant",
            ):
                raise ApiError(400, f"input.{i}: only messages (system, developer, user, assistant)", param="input")
            messages.append({"role": item["role"], "content": _text(item.get("content"), i)})
        fields: dict[str, Any] = {"model": self.model, "messages": messages}
        for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
            if getattr(self, theirs) is not None:
                fields[ours] = getattr(self, theirs)
        fmt = (self.text or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
            fields["response_format"] = {"type": "json_schema", "json_schema": spec}
        elif isinstance(fmt, dict):
            fields["response_format"] = {"type": fmt.get("type")}
        try:
            return ChatCompletionBody.model_validate(fields)
        except ValueError as exc:
            raise ApiError(400, f"the request does not translate into a chat: {exc}", param="text") from None


def _text(content: Any, i: int) -> str:
    """A message's content as text (a string, or ``input_text``/``output_text`` parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") in ("input_text", "output_text") for p in content
    ):
        return "".join(str(p.get("text", "")) for p in content)
    raise ApiError(400, f"input.{i}.content: only text (a string, or input_text parts)", param="input")


def router(view: ClusterView, *, default_max_tokens: int, auth: Sequence[Depends] = ()) -> APIRouter:
    """``POST /v1/responses`` of ``view``'s cluster, behind ``auth``."""
    routes = APIRouter(dependencies=list(auth))

    @routes.post("/v1/responses", response_model=None)
    async def responses(body: ResponsesBody, request: Request):
        if body.model not in (view.model_id, view.model_path.name):
            raise ApiError(404, f"the model '{body.model}' does not exist", code="model_not_found", param="model")
        chat = body.chat()
        reqs, _ = chat_requests(view, chat, default_max_tokens)
        streams = await admitted(view, reqs)
        rid = f"resp_{uuid.uuid4().hex}"
        base = _response(rid, view.model_id, chat, body)
        if body.stream:
            return StreamingResponse(_events(streams[0], base), media_type="text/event-stream")
        out = ChoiceText()

        async def collect() -> None:
            async for ev in streams[0]:
                if ev.type == EventType.ERROR:
                    raise ApiError(500, ev.error or "the cluster failed")
                out.text += ev.text
                if ev.type == EventType.DONE:
                    out.done = ev
                    return

        try:
            await unless_disconnected(request, collect())
        finally:
            await streams[0].aclose()  # type: ignore[attr-defined]
        return _finished(base, out)

    return routes


def _response(rid: str, model: str, chat: ChatCompletionBody, body: ResponsesBody) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "model": model,
        "output": [],
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "temperature": chat.temperature,
        "top_p": chat.top_p,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "text": body.text or {"format": {"type": "text"}},
        "error": None,
        "incomplete_details": None,
        "metadata": {},
        "usage": None,
    }


def _message(mid: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": mid, "status": status, "role": "assistant", "content": [part]}


def _finished(base: dict[str, Any], out: ChoiceText) -> dict[str, Any]:
    """The response once its answer ended: status, output item, usage (input/output tokens)."""
    assert out.done is not None
    cut = out.done.finish_reason == "length"
    u = usage([out])
    return {
        **base,
        "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "output": [_message(f"msg_{base['id'][5:]}", out.text, "incomplete" if cut else "completed")],
        "usage": {
            "input_tokens": u["prompt_tokens"],
            "output_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


async def _events(stream: AsyncIterator[StreamEvent], base: dict[str, Any]) -> AsyncIterator[str]:
    """The Responses API's server-sent events of one answer (see the module)."""
    seq = 0
    mid = f"msg_{base['id'][5:]}"

    def event(kind: str, **data: Any) -> str:
        nonlocal seq
        seq += 1
        return f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': seq - 1, **data})}\n\n"

    where = {"item_id": mid, "output_index": 0, "content_index": 0}
    empty_part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    out = ChoiceText()
    try:
        yield event("response.created", response=base)
        yield event("response.in_progress", response=base)
        yield event(
            "response.output_item.added", output_index=0, item={**_message(mid, "", "in_progress"), "content": []}
        )
        yield event("response.content_part.added", **where, part=empty_part)
        async for ev in stream:
            if ev.type == EventType.ERROR:
                yield event("error", code="server_error", message=ev.error or "the cluster failed", param=None)
                return
            out.text += ev.text
            if ev.text:
                yield event("response.output_text.delta", **where, delta=ev.text, logprobs=[])
            if ev.type == EventType.DONE:
                out.done = ev
                break
        if out.done is None:
            return
        final = _finished(base, out)
        yield event("response.output_text.done", **where, text=out.text, logprobs=[])
        yield event("response.content_part.done", **where, part={**empty_part, "text": out.text})
        yield event("response.output_item.done", output_index=0, item=final["output"][0])
        yield event("response.completed" if final["status"] == "completed" else "response.incomplete", response=final)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]

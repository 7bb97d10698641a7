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
``previous_response_id`` (nothing is stored), images and files (400). The translation into a chat is
:meth:`ResponsesBody.chat`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from homering.api.answer import ChoiceText, admitted, unless_disconnected, usage
from homering.api.errors import ApiError
from homering.api.formats import FUNCTION_NAME
from homering.api.openai import chat_requests
from homering.api.responses import error
from homering.api.schemas import INTEGRAL, MAX_TOKENS_LIMIT, ChatCompletionBody
from homering.api.view import ClusterView
from homering.wire import EventType, StreamEvent


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["input_text", "output_text"]
    text: str


class _InputMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _PlainFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text", "json_object"]


class _SchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(pattern=FUNCTION_NAME)
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class _TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    format: Annotated[_PlainFormat | _SchemaFormat, Field(discriminator="type")] | None = None


class ResponsesBody(BaseModel):
    """``POST /v1/responses``: what this server reads of it (other fields are accepted and ignored)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    input: str | Annotated[list[_InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), INTEGRAL] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: _TextConfig | None = None
    stream: bool = False
    tools: list[Any] = Field(default_factory=list, max_length=0, description="not supported: none")
    previous_response_id: None = Field(default=None, description="not supported: responses are not stored")

    def chat(self) -> ChatCompletionBody:
        """The request as a chat completion request.

        Raises:
            ApiError: 400 with ``param``: a field the chat refuses.
        """
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += [{"role": m.role, "content": m.text()} for m in self.input]
        fields: dict[str, Any] = {"model": self.model, "messages": messages}
        for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p")):
            if getattr(self, theirs) is not None:
                fields[ours] = getattr(self, theirs)
        fmt = self.text.format if self.text is not None else None
        if isinstance(fmt, _SchemaFormat):
            spec = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
            fields["response_format"] = {"type": "json_schema", "json_schema": spec}
        elif fmt is not None:
            fields["response_format"] = {"type": fmt.type}
        try:
            return ChatCompletionBody.model_validate(fields)
        except ValueError as exc:
            raise ApiError(400, f"the request does not translate into a chat: {exc}", param="input") from None


def router(view: ClusterView, *, default_max_tokens: int, auth: Sequence[Depends] = ()) -> APIRouter:
    """``POST /v1/responses`` of ``view``'s cluster, behind ``auth``."""
    routes = APIRouter(dependencies=list(auth))

    @routes.post(
        "/v1/responses",
        response_model=None,
        responses={
            200: {
                "description": "a `response` object; with `stream`, the Responses API's server-sent events",
                "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {}}},
            },
            400: error("a malformed request (a field's type or range, max_output_tokens over the context)"),
            404: error("this cluster does not serve the model"),
            413: error("the prompt does not fit the context"),
            429: error("every sequence is busy and the queue is full"),
            500: error("the cluster failed the request"),
            503: error("no plan is ready (the agents are joining, loading or re-planning)"),
        },
    )
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
        "text": body.text.model_dump(by_alias=True, exclude_none=True) if body.text else {"format": {"type": "text"}},
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

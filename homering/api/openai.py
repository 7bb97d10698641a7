"""The OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.

Both generation routes answer one JSON object, or with ``stream`` server-sent events: one chunk per text delta,
the final chunk (with ``stream_options.include_usage`` one more with the usage), then ``data: [DONE]``; a cluster
failure mid-stream is an error object event before ``[DONE]``. A client that goes away cancels its request (its
KV sequence is freed). The request bodies are :mod:`homering.api.schemas`'s; the errors
:mod:`homering.api.errors`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import StreamingResponse

from homering.api.errors import ApiError
from homering.api.names import model_aliases, resolve_model
from homering.api.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ModelCard,
    ModelList,
    error,
    generation_responses,
)
from homering.api.schemas import ChatCompletionBody, CompletionBody, GenerationBody
from homering.api.view import ClusterView, RequestRefused
from homering.wire import ChatMessage, EventType, GenerateRequest, StreamEvent

T = TypeVar("T")

__all__ = ["ChatCompletionBody", "CompletionBody", "router"]


def router(view: ClusterView, *, default_max_tokens: int, auth: Sequence[Depends] = ()) -> APIRouter:
    """The OpenAI routes of ``view``'s cluster, behind ``auth``; ``max_tokens`` left out is
    ``default_max_tokens`` (bounded by the context)."""
    routes = APIRouter(dependencies=list(auth))

    def check_model(name: str) -> None:
        resolve_model(view, name)

    @routes.get("/v1/models", response_model=None, responses={200: {"model": ModelList}})
    async def models():
        return {"object": "list", "data": [_model_card(view)]}

    @routes.get(
        "/v1/models/{name}",
        response_model=None,
        responses={200: {"model": ModelCard}, 404: error("this cluster does not serve the model")},
    )
    async def model(name: str):
        check_model(name)
        return _model_card(view)

    @routes.post(
        "/v1/chat/completions", response_model=None, responses=generation_responses(ChatCompletion, ChatCompletionChunk)
    )
    async def chat_completions(body: ChatCompletionBody, request: Request):
        check_model(body.model)
        messages = [
            ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text()) for m in body.messages
        ]
        req = GenerateRequest(
            request_id=f"chatcmpl-{uuid.uuid4().hex[:20]}",
            messages=messages,
            sampling=body.sampling(default_max_tokens, view.n_ctx),
            speculative=body.speculative.settings() if body.speculative else None,
        )
        return await _answer(view, req, body, request, chat=True)

    @routes.post("/v1/completions", response_model=None, responses=generation_responses(Completion, CompletionChunk))
    async def completions(body: CompletionBody, request: Request):
        check_model(body.model)
        req = GenerateRequest(
            request_id=f"cmpl-{uuid.uuid4().hex[:24]}",
            sampling=body.sampling(default_max_tokens, view.n_ctx),
            speculative=body.speculative.settings() if body.speculative else None,
            **body.prompt_fields(),
        )
        return await _answer(view, req, body, request, chat=False)

    return routes


def _model_card(view: ClusterView) -> dict[str, Any]:
    return {
        "id": view.model_id,
        "object": "model",
        "created": int(view.started),
        "owned_by": "homering",
        "aliases": list(model_aliases(view)[1:]),
    }


def _usage(done: StreamEvent) -> dict[str, int]:
    p, c = len(done.prompt_token_ids or []), len(done.token_ids or [])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def _answer(view: ClusterView, req: GenerateRequest, body: GenerationBody, request: Request, *, chat: bool):
    """Run ``req`` and answer as one JSON object or as server-sent events.

    Raises:
        ApiError: the cluster refused the request (its status), or failed it (500).
    """
    events = view.submit(req)
    try:
        first = await events.__anext__()  # admission errors surface here, before any byte is sent
    except RequestRefused as exc:
        await events.aclose()
        raise ApiError(exc.status, exc.message, code=exc.code) from None
    except StopAsyncIteration:
        raise ApiError(500, "the cluster ended the request without an answer") from None
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    async def all_events() -> AsyncIterator[StreamEvent]:
        yield first
        async for ev in events:
            yield ev

    if body.stream:
        return StreamingResponse(
            _sse(all_events(), events, req.request_id, kind, created, view.model_id, chat, body.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def collect() -> tuple[str, StreamEvent]:
        text = ""
        async for ev in all_events():
            if ev.type == EventType.ERROR:
                raise ApiError(500, ev.error or "the cluster failed")
            text += ev.text
            if ev.type == EventType.DONE:
                return text, ev
        raise ApiError(500, "the stream ended without a final event")

    async with contextlib.aclosing(events):
        text, done = await _unless_disconnected(request, collect())
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(done.finish_reason), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": req.request_id,
        "object": kind,
        "created": created,
        "model": view.model_id,
        "choices": [choice],
        "usage": _usage(done),
        "system_fingerprint": view.fingerprint,
    }


async def _unless_disconnected(request: Request, coro: Awaitable[T]) -> T:
    """Await ``coro``, cancelling it if the HTTP client goes away first (its sequence is then freed)."""
    task = asyncio.ensure_future(coro)

    async def watch() -> None:
        while not task.done():
            if await request.is_disconnected():
                task.cancel()
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    finally:
        watcher.cancel()


def _chunk(
    rid: str,
    obj: str,
    created: int,
    model: str,
    chat: bool,
    include_usage: bool,
    delta_or_text: str | None,
    finish: str | None,
    *,
    first: bool = False,
) -> str:
    """One ``data: {chunk}`` event: a text delta (chat: ``delta``, with the role in the ``first``), or the last
    one's ``finish_reason``."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if delta_or_text is not None:
            delta["content"] = delta_or_text
        choice["delta"] = delta
    else:
        choice["text"] = delta_or_text or ""
    out: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if include_usage:
        out["usage"] = None
    return f"data: {json.dumps(out)}\n\n"


async def _sse(
    stream: AsyncIterator[StreamEvent],
    events: AsyncGenerator[StreamEvent, None],
    rid: str,
    kind: str,
    created: int,
    model: str,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events: one ``data: {chunk}`` per token, the final chunk, then ``data: [DONE]``."""
    obj = f"{kind}.chunk" if chat else kind

    def chunk(delta_or_text: str | None, finish: str | None, *, first: bool = False) -> str:
        return _chunk(rid, obj, created, model, chat, include_usage, delta_or_text, finish, first=first)

    async with contextlib.aclosing(events):
        if chat:
            yield chunk("", None, first=True)
        async for ev in stream:
            if ev.type == EventType.ERROR:
                err = {
                    "error": {
                        "message": ev.error or "the cluster failed",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
                yield f"data: {json.dumps(err)}\n\n"
                break
            if ev.type == EventType.TOKEN:
                if ev.text:
                    yield chunk(ev.text, None)
                continue
            if ev.text:
                yield chunk(ev.text, None)
            yield chunk(None, _finish(ev.finish_reason)) if chat else chunk("", _finish(ev.finish_reason))
            if include_usage:
                out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": _usage(ev)}
                yield f"data: {json.dumps(out)}\n\n"
            break
        yield "data: [DONE]\n\n"

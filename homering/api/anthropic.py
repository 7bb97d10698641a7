"""The Anthropic Messages API on the controller's port: ``POST /v1/messages``.

One mechanism, two wire formats: the body is translated (:mod:`homering.api.anthropic_schemas`) into an
OpenAI chat completion that runs through the OpenAI route in process (:mod:`homering.api.bridge`), and the
answer is translated back: a ``message`` object (``content`` blocks: ``text``, then ``tool_use``), or with
``stream`` server-sent events ``message_start``, ``content_block_start``, ``content_block_delta`` (``text_delta``,
``input_json_delta``), ``content_block_stop``, ``message_delta`` (the stop reason and usage), ``message_stop``.
Errors are Anthropic's ``{"type": "error", "error": {"type", "message"}}`` with the field named in the
message; in a stream, an ``error`` event. The key is taken as ``x-api-key`` (Anthropic's SDKs) or as
``Authorization: Bearer``.
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from homering.api.anthropic_schemas import PARAMS, MessagesBody, openai_request
from homering.api.bridge import Piece, answer_piece, error_route, openai_json, openai_stream, stream_pieces
from homering.api.errors import require_api_key

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
"""Anthropic's error ``type`` per HTTP status; others are ``invalid_request_error`` (4xx) or ``api_error``."""
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}
"""OpenAI's finish reasons as Anthropic's stop reasons; any other (``stop``) is ``end_turn``, also where one of
the ``stop_sequences`` ended the answer (the OpenAI answer does not say which stop did), so ``stop_sequence`` is
always null."""


def _error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def render_error(status: int, message: str, param: str | None, code: str | None) -> JSONResponse:
    """An error as Anthropic answers it: ``{"type": "error", "error": {"type", "message"}}``, the field first."""
    if param:
        field = PARAMS.get(param, param)
        message = message.replace(f"{param}:", f"{field}:", 1)
        if not message.startswith(field):
            message = f"{field}: {message}"
    return JSONResponse(
        status_code=status, content={"type": "error", "error": {"type": _error_type(status), "message": message}}
    )


async def require_key(request: Request) -> None:
    """The API key as Anthropic's SDKs send it (``x-api-key``), or as ``Authorization: Bearer``.

    Raises:
        ApiError: 401, see :func:`~homering.api.errors.require_api_key`.
    """
    key: str | None = getattr(request.app.state, "api_key", None)
    given = request.headers.get("x-api-key")
    if key and given is not None and hmac.compare_digest(given.strip().encode(), key.encode()):
        return
    await require_api_key(request)


def router() -> APIRouter:
    """``POST /v1/messages``, behind :func:`require_key` (open where the app has no key)."""
    routes = APIRouter(
        dependencies=[Depends(require_key)], route_class=error_route(render_error), include_in_schema=False
    )

    @routes.post("/v1/messages")
    async def messages(body: MessagesBody, request: Request):
        openai = openai_request(body)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        if not body.stream:
            return _message(mid, body.model, answer_piece(await openai_json(request, "/v1/chat/completions", openai)))
        pieces = stream_pieces(await openai_stream(request, "/v1/chat/completions", openai))
        return StreamingResponse(
            _events(pieces, mid, body.model),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return routes


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call as a ``tool_use`` block (``input`` the parsed arguments)."""
    fn = call.get("function") or {}
    try:
        args = json.loads(fn.get("arguments") or "{}")
    except ValueError:
        args = {"_raw": fn.get("arguments")}
    return {
        "type": "tool_use",
        "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
        "name": fn.get("name", ""),
        "input": args,
    }


def _usage(piece: Piece) -> dict[str, int]:
    return {
        "input_tokens": piece.usage.get("prompt_tokens", 0),
        "output_tokens": piece.usage.get("completion_tokens", 0),
    }


def _message(mid: str, model: str, piece: Piece) -> dict[str, Any]:
    """The ``message`` object of a whole answer."""
    content = [{"type": "text", "text": piece.text}] if piece.text or not piece.tool_calls else []
    return {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content + [_tool_use(c) for c in piece.tool_calls],
        "stop_reason": STOP_REASONS.get(piece.finish or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": _usage(piece),
    }


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n"


def _tool_events(calls: list[dict[str, Any]], first_index: int) -> list[str]:
    """The events of the tool calls: a ``tool_use`` block each, its input as one ``input_json_delta``."""
    out = []
    for i, call in enumerate(calls, start=first_index):
        block = _tool_use(call)
        out.append(_event("content_block_start", {"index": i, "content_block": block | {"input": {}}}))
        partial = json.dumps(block["input"])
        out.append(
            _event("content_block_delta", {"index": i, "delta": {"type": "input_json_delta", "partial_json": partial}})
        )
        out.append(_event("content_block_stop", {"index": i}))
    return out


async def _events(pieces: AsyncIterator[Piece], mid: str, model: str) -> AsyncIterator[str]:
    """The stream's server-sent events, ``message_start`` to ``message_stop`` (or an ``error`` event)."""
    start = _message(mid, model, Piece()) | {"content": [], "stop_reason": None}
    yield _event("message_start", {"message": start})
    yield _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
    async for piece in pieces:
        if piece.error is not None:
            yield _event("error", {"error": {"type": "api_error", "message": piece.error}})
            return
        if piece.text:
            yield _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": piece.text}})
            continue
        yield _event("content_block_stop", {"index": 0})
        for event in _tool_events(piece.tool_calls, 1):
            yield event
        stop = STOP_REASONS.get(piece.finish or "stop", "end_turn")
        yield _event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None}, "usage": _usage(piece)})
        yield _event("message_stop", {})

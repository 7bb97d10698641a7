"""One mechanism, several wire formats: the Ollama and Anthropic routes call the OpenAI routes in process.

A translated request goes through the app itself (an ASGI call on ``/v1/chat/completions``,
``/v1/completions`` or ``/v1/embeddings``), so that it gets exactly what an OpenAI client gets: the same
validation, model names, sampling, grammar, tools and streaming (:mod:`homering.api.openai`). The answer comes
back as the OpenAI JSON object, or as the stream's chunks, one dict each, as they are sent; the caller
translates them into its own format. Nothing crosses a socket, and a client that goes away cancels the
request as it would on the OpenAI route (its KV sequence is freed).

Errors: an OpenAI error object becomes :class:`OpenAIError` (status, message, ``param``, ``code``); a route
class made by :func:`error_route` answers it, and request validation errors, in its API's own format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from homering.api.errors import ApiError

Message = dict[str, Any]


@dataclass
class OpenAIError(Exception):
    """An error object of the OpenAI routes: its HTTP ``status``, ``message``, the field (``param``) and ``code``."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message


class _Call:
    """One in-process ASGI request: the app runs in a task and its messages arrive on a queue."""

    def __init__(self, request: Request, path: str, body: dict[str, Any] | None) -> None:
        self.outer = request
        self.body = json.dumps(body).encode() if body is not None else b""
        self.sent: asyncio.Queue[Message] = asyncio.Queue()
        self._body_given = False
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(self.body)).encode())]
        key = getattr(request.app.state, "api_key", None)
        if key:  # the outer route has checked the client's key (Bearer or x-api-key)
            headers.append((b"authorization", f"Bearer {key}".encode()))
        self.scope: dict[str, Any] = {
            **{k: request.scope[k] for k in ("asgi", "http_version", "server", "client") if k in request.scope},
            "type": "http",
            "method": "POST" if body is not None else "GET",
            "scheme": request.scope.get("scheme", "http"),
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "app": request.app,
        }
        self.task = asyncio.ensure_future(request.app(self.scope, self._receive, self._send))

    async def _receive(self) -> Message:
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        # after the body, the outer client's own messages: its going away (http.disconnect) ends this one too
        return dict(await self.outer.receive())

    async def _send(self, message: Message) -> None:
        await self.sent.put(message)

    async def next(self) -> Message:
        """The app's next message; ``{"type": "done"}`` once it has returned."""
        getter = asyncio.ensure_future(self.sent.get())
        done, _ = await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if not self.sent.empty():
            return self.sent.get_nowait()
        self.task.result()  # the app's own exception, if any
        return {"type": "done"}

    async def close(self) -> None:
        if not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


async def _start(request: Request, path: str, body: dict[str, Any] | None) -> tuple[_Call, int, str]:
    """Send ``body`` to ``path`` (None: a GET); returns the call, the answer's status and its media type."""
    call = _Call(request, path, body)
    first = await call.next()
    if first["type"] != "http.response.start":
        await call.close()
        raise OpenAIError(500, "the OpenAI route gave no answer")
    headers = {k.decode().lower(): v.decode() for k, v in first.get("headers", [])}
    return call, first["status"], headers.get("content-type", "")


async def _read_all(call: _Call) -> bytes:
    out = b""
    while (msg := await call.next())["type"] == "http.response.body":
        out += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    return out


def _raise_error(status: int, raw: bytes) -> None:
    """Raise the OpenAI error object in ``raw`` (status >= 400) as :class:`OpenAIError`."""
    try:
        err = json.loads(raw)["error"]
    except (ValueError, KeyError, TypeError):
        raise OpenAIError(status, raw.decode(errors="replace") or f"HTTP {status}") from None
    raise OpenAIError(status, str(err.get("message")), err.get("param"), err.get("code"))


async def openai_json(request: Request, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """POST ``body`` to the OpenAI route ``path`` (without ``stream``; None: GET ``path``) and return its JSON
    answer.

    Raises:
        OpenAIError: the route answered an error object (its status, message, param and code).
    """
    call, status, _ = await _start(request, path, body)
    try:
        raw = await _read_all(call)
    finally:
        await call.close()
    if status >= 400:
        _raise_error(status, raw)
    answer: dict[str, Any] = json.loads(raw)
    return answer


async def openai_stream(request: Request, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """POST ``body`` (with ``stream``) to the OpenAI route ``path``; returns its chunks, one dict per
    ``data:`` event, without the final ``[DONE]``. An error before the stream starts is raised here; one in the
    stream is a chunk with an ``error`` object (the OpenAI route's own).

    Raises:
        OpenAIError: the route refused the request (its status, message, param and code).
    """
    call, status, media = await _start(request, path, body)
    if status >= 400 or not media.startswith("text/event-stream"):
        try:
            raw = await _read_all(call)
        finally:
            await call.close()
        _raise_error(status if status >= 400 else 500, raw)
    return _chunks(call)


async def _chunks(call: _Call) -> AsyncIterator[dict[str, Any]]:
    """The stream's ``data:`` events as dicts; closing this iterator cancels the request."""
    pending = b""
    try:
        while (msg := await call.next())["type"] == "http.response.body":
            pending += msg.get("body", b"")
            *events, pending = pending.split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: "):
                        continue
                    data = line[len(b"data: ") :]
                    if data == b"[DONE]":
                        return
                    yield json.loads(data)
            if not msg.get("more_body", False):
                return
    finally:
        await call.close()


ErrorRenderer = Callable[[int, str, "str | None", "str | None"], Response]
"""Renders an error in an API's own format: ``(status, message, param, code) -> response``."""


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A request validation error as ``(message, field)``: the first error, its field named first."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    return f"{where or 'body'}: {first.get('msg', 'invalid request')}", where


def error_route(render: ErrorRenderer) -> type[APIRoute]:
    """An :class:`~fastapi.routing.APIRoute` class whose routes answer :class:`OpenAIError`,
    :class:`~homering.api.errors.ApiError` and request validation errors (400, the field named) with
    ``render``: each API's errors in its own format, whatever the app's handlers do for the others."""

    class ErrorRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    message, field = _validation_message(exc)
                    return render(400, message, field, None)
                except OpenAIError as exc:
                    return render(exc.status, exc.message, exc.param, exc.code)
                except ApiError as exc:
                    return render(exc.status, exc.message, exc.param, exc.code)

            return handle

    return ErrorRoute


@dataclass
class Piece:
    """A piece of an answer, whatever the API: ``text``; or, last, the ``finish`` reason (OpenAI's: ``stop``,
    ``length``, ``tool_calls``), the ``tool_calls`` (OpenAI's shape, ``arguments`` a JSON string) and the
    ``usage`` (``prompt_tokens``, ``completion_tokens``); or an ``error`` message (the cluster failed)."""

    text: str = ""
    finish: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def answer_piece(answer: dict[str, Any]) -> Piece:
    """An OpenAI chat completion or completion (not streamed) as one :class:`Piece`."""
    choice = answer["choices"][0]
    message = choice.get("message") or {}
    return Piece(
        text=(message.get("content") if "message" in choice else choice.get("text")) or "",
        finish=choice.get("finish_reason"),
        tool_calls=list(message.get("tool_calls") or []),
        usage=answer.get("usage") or {},
    )


def _add_tool_deltas(calls: dict[int, dict[str, Any]], deltas: list[dict[str, Any]]) -> None:
    """Accumulate streamed tool call deltas (by ``index``: the id and name once, the arguments in parts)."""
    for d in deltas:
        call = calls.setdefault(
            d.get("index", 0), {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}
        )
        call["id"] = d.get("id") or call["id"]
        fn = d.get("function") or {}
        call["function"]["name"] += fn.get("name") or ""
        call["function"]["arguments"] += fn.get("arguments") or ""


async def stream_pieces(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[Piece]:
    """An OpenAI stream's chunks (chat or completion) as pieces: one per text delta, then one last with the
    finish reason, the whole tool calls and the usage; or an error piece. Closing this closes ``chunks``."""
    last = Piece()
    calls: dict[int, dict[str, Any]] = {}
    try:
        async for chunk in chunks:
            if "error" in chunk:
                yield Piece(error=str((chunk["error"] or {}).get("message") or "the cluster failed"))
                return
            last.usage = chunk.get("usage") or last.usage
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                text = delta.get("content") if "delta" in choice else choice.get("text")
                if text:
                    yield Piece(text=text)
                _add_tool_deltas(calls, delta.get("tool_calls") or [])
                last.finish = choice.get("finish_reason") or last.finish
        last.tool_calls = [calls[i] for i in sorted(calls)]
        yield last
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]

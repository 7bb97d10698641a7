"""Answering a generation request: one or ``n`` sequences, as one JSON object or as server-sent events.

Each of the ``n`` choices is a :class:`~homering.wire.GenerateRequest` of its own (its own KV sequence; the
prompt is prefilled once per choice). A choice's text becomes a chat message (content, or ``tool_calls``
parsed by the request's :class:`~homering.api.tools.ChatPlan`) or a completion's text, with its ``logprobs``
when asked (OpenAI's chat shape ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`` or the legacy
completion shape ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``).

Streams: one chunk per text delta and choice, the final chunk of each choice, with
``stream_options.include_usage`` one more with the usage, then ``data: [DONE]``. A choice that may hold tool
calls is sent whole when it ends (its content, or its calls as ``delta.tool_calls``: a first chunk with the
call's id and name, a second with its arguments, as the OpenAI SDK assembles them). A cluster failure
mid-stream is an error object event before ``[DONE]``; a client that goes away cancels every choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from homering.api.errors import ApiError
from homering.api.tools import ChatPlan
from homering.api.view import ClusterView, RequestRefused
from homering.wire import EventType, GenerateRequest, StreamEvent, TokenLogprob

T = TypeVar("T")
Events = AsyncGenerator[StreamEvent, None]


@dataclass
class Shape:
    """How a request's answer is shaped: chat or completion, tool parsing, logprobs, usage in the stream."""

    chat: bool
    plan: ChatPlan | None = None
    logprobs: bool = False
    include_usage: bool = False

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def buffered(self) -> bool:
        """The answer is read whole before it is sent (it may hold tool calls)."""
        return self.plan is not None and self.plan.mode is not None


@dataclass
class ChoiceText:
    """One choice's output so far: its text, its tokens' log-probabilities and its final event."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: StreamEvent | None = None


def finish_reason(reason: str | None) -> str:
    """OpenAI's ``finish_reason`` of a ``done`` event's (``cancelled`` never reaches a client)."""
    return "length" if reason == "length" else "stop"


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """Chat completions' ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""

    def one(t: TokenLogprob) -> dict[str, Any]:
        return {"token": t.token, "logprob": t.logprob, "bytes": t.bytes}

    return {"content": [{**one(t), "top_logprobs": [one(a) for a in t.top]} for t in items], "refusal": None}


def completion_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """Legacy completions' ``logprobs``: parallel lists of tokens, log-probabilities, alternatives, offsets."""
    offsets, at = [], 0
    for t in items:
        offsets.append(at)
        at += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [{a.token: a.logprob for a in t.top} for t in items],
        "text_offset": offsets,
    }


def make_choice(index: int, out: ChoiceText, shape: Shape) -> dict[str, Any]:
    """A finished choice of a non-streamed answer."""
    assert out.done is not None
    finish = finish_reason(out.done.finish_reason)
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
    if shape.logprobs:
        choice["logprobs"] = chat_logprobs(out.logprobs) if shape.chat else completion_logprobs(out.logprobs)
    if not shape.chat:
        choice["text"] = out.text
        return choice
    content, calls = shape.plan.parse(out.text) if shape.plan is not None else (out.text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
        choice["finish_reason"] = "tool_calls"
    choice["message"] = message
    return choice


def usage(outs: list[ChoiceText]) -> dict[str, int]:
    """Tokens of the prompt (once) and of every choice's answer."""
    dones = [o.done for o in outs if o.done is not None]
    p = len(dones[0].prompt_token_ids or []) if dones else 0
    c = sum(len(d.token_ids or []) for d in dones)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def admitted(view: ClusterView, reqs: list[GenerateRequest]) -> list[AsyncIterator[StreamEvent]]:
    """Submit every choice; each one's events, its first already read (admission errors surface here).

    Raises:
        ApiError: the cluster refused a choice (its status; the others are cancelled), or ended it at once (500).
    """
    out: list[AsyncIterator[StreamEvent]] = []
    opened: list[Events] = []
    try:
        for req in reqs:
            events = view.submit(req)
            opened.append(events)
            try:
                first = await events.__anext__()
            except RequestRefused as exc:
                raise ApiError(exc.status, exc.message, code=exc.code, param=getattr(exc, "param", None)) from None
            except StopAsyncIteration:
                raise ApiError(500, "the cluster ended the request without an answer") from None
            out.append(_prepend(first, events))
    except BaseException:
        for ev in opened:
            await ev.aclose()
        raise
    return out


async def _prepend(first: StreamEvent, rest: Events) -> AsyncIterator[StreamEvent]:
    try:
        yield first
        async for ev in rest:
            yield ev
    finally:
        await rest.aclose()


async def answer(view: ClusterView, reqs: list[GenerateRequest], shape: Shape, request: Request, *, stream: bool):
    """Run the choices ``reqs`` (one per ``n``) and answer as one JSON object or as server-sent events.

    Raises:
        ApiError: the cluster refused the request (its status), or failed it (500).
    """
    streams = await admitted(view, reqs)
    rid, created = reqs[0].request_id, int(time.time())
    if stream:
        return StreamingResponse(
            _sse(streams, shape, rid, created, view.model_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def collect(events: AsyncIterator[StreamEvent]) -> ChoiceText:
        out = ChoiceText()
        async for ev in events:
            if ev.type == EventType.ERROR:
                raise ApiError(500, ev.error or "the cluster failed")
            out.text += ev.text
            if ev.logprob is not None:
                out.logprobs.append(ev.logprob)
            if ev.type == EventType.DONE:
                out.done = ev
                return out
        raise ApiError(500, "the stream ended without a final event")

    async with contextlib.AsyncExitStack() as stack:
        for s in streams:
            stack.push_async_callback(s.aclose)  # type: ignore[attr-defined]
        outs = await unless_disconnected(request, asyncio.gather(*(collect(s) for s in streams)))
    return {
        "id": rid,
        "object": shape.kind,
        "created": created,
        "model": view.model_id,
        "choices": [make_choice(i, o, shape) for i, o in enumerate(outs)],
        "usage": usage(outs),
        "system_fingerprint": view.fingerprint,
    }


async def unless_disconnected(request: Request, coro: Awaitable[T]) -> T:
    """Await ``coro``, cancelling it if the HTTP client goes away first (its sequences are then freed)."""
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


async def _merged(streams: list[AsyncIterator[StreamEvent]]) -> AsyncIterator[tuple[int, StreamEvent]]:
    """The events of every choice as they come, with the choice's index; each choice's ends at its last."""
    if len(streams) == 1:  # the common case, without a task per choice
        async for ev in streams[0]:
            yield 0, ev
        return
    queue: asyncio.Queue[tuple[int, StreamEvent | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[StreamEvent]) -> None:
        try:
            async for ev in s:
                await queue.put((i, ev))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, got = await queue.get()
            if got is None:
                live -= 1
            else:
                yield i, got
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _sse(
    streams: list[AsyncIterator[StreamEvent]], shape: Shape, rid: str, created: int, model: str
) -> AsyncIterator[str]:
    """Server-sent events of every choice, then the usage (when asked) and ``data: [DONE]``."""
    obj = f"{shape.kind}.chunk" if shape.chat else shape.kind
    head = {"id": rid, "object": obj, "created": created, "model": model}
    outs = [ChoiceText() for _ in streams]
    pending: list[list[TokenLogprob]] = [[] for _ in streams]

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {**head, "choices": choices, **({"usage": None} if shape.include_usage else {}), **extra}
        return f"data: {json.dumps(body)}\n\n"

    def chunk(i: int, delta: dict[str, Any] | str, finish: str | None = None) -> str:
        choice: dict[str, Any] = {"index": i, "finish_reason": finish, "logprobs": None}
        if shape.logprobs and pending[i]:
            choice["logprobs"] = (chat_logprobs if shape.chat else completion_logprobs)(pending[i])
            pending[i] = []
        choice["delta" if shape.chat else "text"] = delta
        return event([choice])

    try:
        if shape.chat:
            for i in range(len(streams)):
                yield chunk(i, {"role": "assistant", "content": ""})
        async for i, ev in _merged(streams):
            if ev.type == EventType.ERROR:
                err = {"message": ev.error or "the cluster failed", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
            if ev.logprob is not None:
                pending[i].append(ev.logprob)
            outs[i].text += ev.text
            if ev.type == EventType.TOKEN:
                if ev.text and not shape.buffered:
                    yield chunk(i, {"content": ev.text} if shape.chat else ev.text)
                continue
            outs[i].done = ev
            for line in _last_chunks(i, ev, outs[i], shape, chunk):
                yield line
        else:
            if shape.include_usage:
                yield event([], usage=usage(outs))
        yield "data: [DONE]\n\n"
    finally:
        for s in streams:
            await s.aclose()  # type: ignore[attr-defined]


def _last_chunks(i: int, done: StreamEvent, out: ChoiceText, shape: Shape, chunk: Any) -> list[str]:
    """A choice's last chunks: its held-back text (or, buffered, its content or tool calls) and its finish."""
    finish = finish_reason(done.finish_reason)
    if not shape.chat:
        return ([chunk(i, done.text)] if done.text else []) + [chunk(i, "", finish)]
    if not shape.buffered:
        return ([chunk(i, {"content": done.text})] if done.text else []) + [chunk(i, {}, finish)]
    assert shape.plan is not None
    content, calls = shape.plan.parse(out.text)
    lines = [chunk(i, {"content": content})] if content else []
    for n, c in enumerate(calls):
        fn = c["function"]
        first = {"index": n, "id": c["id"], "type": "function", "function": {"name": fn["name"], "arguments": ""}}
        lines.append(chunk(i, {"tool_calls": [first]}))
        lines.append(chunk(i, {"tool_calls": [{"index": n, "function": {"arguments": fn["arguments"]}}]}))
    return [*lines, chunk(i, {}, "tool_calls" if calls else finish)]

"""The OpenAI-compatible HTTP API of the controller (FastAPI, served by uvicorn on the controller's loop).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with
``stream`` as server-sent events ending in ``data: [DONE]``), ``GET
/v1/models``, ``GET /v1/cluster``, ``GET /health`` and ``GET /metrics``
(Prometheus); for agents without the model, ``GET /v1/windows/<sha256>`` (a
window file of the current plan, or a probe window) and ``GET
/v1/windows/probe/<start>-<end>-<role>`` (see :mod:`homering.cluster.windows`). Errors are OpenAI error objects (``{"error": {"message",
"type", "param", "code"}}``): 400 bad request, 401 a missing or wrong API key,
404 unknown model, 413 the prompt does not fit the context, 429 the queue is
full, 503 no plan is ready.

With an API key configured, every ``/v1/*`` route and ``/metrics`` require
``Authorization: Bearer <key>`` (the :func:`require_api_key` dependency);
``/health`` stays open for health checks.

The request and response shapes follow OpenAI's API reference for chat
completions and (legacy) completions; fields this server does not use
(``user``, ``logit_bias``, …) are accepted and ignored, and ``n`` must be 1.
Extensions, as in llama.cpp's server: ``top_k``, ``min_p`` and ``ignore_eos``. Sampling
fields a client leaves out take llama.cpp's defaults (temperature 0.8, top_k 40, top_p 0.95,
min_p 0.05), not OpenAI's (temperature 1, no top-k), which make small models ramble.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from homering.api.metrics import CONTENT_TYPE
from homering.cluster.schema import SHA256, WINDOWS_PATH, ChatMessage, GenerateRequest, Sampling, StreamEvent

if TYPE_CHECKING:
    from homering.cluster.controller import Controller

log = logging.getLogger("homering.api")

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}


class ApiError(Exception):
    """An error answered as an OpenAI error object with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers

    def response(self) -> JSONResponse:
        """The error as a JSON response: ``{"error": {"message", "type", "param", "code"}}``."""
        return JSONResponse(status_code=self.status, headers=self.headers, content={"error": {
            "message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
            "param": self.param, "code": self.code}})


# ------------------------------------------------------------------ request bodies
MAX_TOKENS_LIMIT = 1 << 20
"""The largest ``max_tokens`` any request may ask for (:class:`Sampling`'s bound); the context bounds it further."""


def _lone_surrogate(value: Any, where: str) -> str | None:
    """The path (``messages.0.content``) of the first string in ``value`` that is not valid Unicode, or None.

    JSON may carry ``"\ud800"``, a lone UTF-16 surrogate: Python decodes it into a
    ``str`` that no encoder accepts, so it would fail later, deep in templating,
    tokenization or a response.
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if (found := _lone_surrogate(k, where) if isinstance(k, str) else None) is not None:
            return found
        if (found := _lone_surrogate(v, f"{where}.{k}" if where else str(k))) is not None:
            return found
    return None


class _Strict(BaseModel):
    # strict types: "5" is no integer and "yes" no boolean; OpenAI fields this server ignores
    # (user, logit_bias, …) are accepted
    model_config = ConfigDict(extra="allow", strict=True)


class _Body(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (where := _lone_surrogate(data, "")) is not None:
            raise PydanticCustomError("invalid_unicode", "{where}: a lone surrogate (e.g. \\ud800) is not valid "
                                      "Unicode text", {"where": where})
        return data

    model: str
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    # sampling fields a client leaves out (or sends as null) take llama.cpp's defaults (Sampling's)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="default 0.8")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="default 0.95")
    top_k: int | None = Field(default=None, ge=0, description="default 40; 0 turns it off")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="default 0.05; 0 turns it off")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # llama.cpp server's extension: generate max_tokens past end-of-generation

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def sampling(self, default_max: int, n_ctx: int | None = None) -> Sampling:
        """The request's :class:`Sampling`; fields left out take its defaults (llama.cpp's).

        Raises:
            ApiError: 400, ``max_tokens`` (or ``max_completion_tokens``) is more than the context (``n_ctx``).
        """
        chosen = {f: v for f in ("temperature", "top_p", "top_k", "min_p") if (v := getattr(self, f)) is not None}
        for field in ("max_completion_tokens", "max_tokens"):
            asked = getattr(self, field)
            if n_ctx is not None and asked is not None and asked > n_ctx:
                raise ApiError(400, f"{field}: {asked} is more than the context holds ({n_ctx} tokens)", param=field)
        return Sampling(max_tokens=self.max_completion_tokens or self.max_tokens or min(default_max, n_ctx or default_max),
                        seed=self.seed, **chosen,
                        stop=self.stop or [], presence_penalty=self.presence_penalty,
                        frequency_penalty=self.frequency_penalty, ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _ContentPart(_Strict):
    type: str
    text: str | None = None


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_ContentPart] | None = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionBody(_Body):
    messages: list[_Message] = Field(min_length=1)


class CompletionBody(_Body):
    prompt: str | list[str] | list[int]

    def prompt_fields(self) -> dict:
        p = self.prompt
        if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            return {"prompt_token_ids": list(p)}
        if isinstance(p, list):
            if len(p) != 1:
                raise ApiError(400, "give one prompt (a string, or a list of one string)", param="prompt")
            p = p[0]
        return {"prompt": p}


# ------------------------------------------------------------------ authentication
async def require_api_key(request: Request) -> None:
    """FastAPI dependency: require ``Authorization: Bearer <key>`` when the app has a key.

    The key is ``request.app.state.api_key`` (None or unset: every request
    passes). Add it to a route or router with ``dependencies=[Depends(require_api_key)]``.

    Raises:
        ApiError: 401 ``invalid_api_key``, the header is missing or the key is wrong.
    """
    key: str | None = getattr(request.app.state, "api_key", None)
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "you did not provide an API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers=challenge)
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key", headers=challenge)


# ------------------------------------------------------------------ the app
def create_app(controller: "Controller", *, default_max_tokens: int = 256, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``controller``'s cluster.

    With ``api_key`` every route but ``/health`` requires it (see :func:`require_api_key`).
    """
    app = FastAPI(title="homering", description="OpenAI-compatible API of a homering cluster",
                  version="1")
    app.state.api_key = api_key
    authed = APIRouter(dependencies=[Depends(require_api_key)])

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON").response()
        if first.get("type") == "invalid_unicode":
            where = first["ctx"]["where"]
            return ApiError(400, first["msg"], param=where.split(".")[0]).response()
        return ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        return ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
                        ).response()

    def check_model(name: str) -> None:
        if name not in (controller.model_id, controller.model_path.name):
            raise ApiError(404, f"the model '{name}' does not exist; this cluster serves '{controller.model_id}'",
                           code="model_not_found", param="model")

    @app.get("/health")
    async def health():
        ok = controller.ready
        return JSONResponse(status_code=200 if ok else 503, content={
            "status": "ok" if ok else controller.state, "model": controller.model_id,
            "agents": len(controller.live_agents()), "plan_id": controller.plan.plan_id if controller.plan else None})

    @authed.get("/metrics")
    async def metrics():
        return Response(controller.metrics.exposition(), media_type=CONTENT_TYPE)

    @authed.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(controller)]}

    @authed.get("/v1/models/{name}")
    async def model(name: str):
        check_model(name)
        return _model_card(controller)

    @authed.get("/v1/cluster")
    async def cluster():
        return cluster_report(controller)

    @authed.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request):
        check_model(body.model)
        messages = [ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
                    for m in body.messages]
        req = GenerateRequest(request_id=f"chatcmpl-{uuid.uuid4().hex[:20]}", messages=messages,
                              sampling=body.sampling(default_max_tokens, controller.n_ctx))
        return await _answer(controller, req, body, request, chat=True)

    @authed.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_model(body.model)
        req = GenerateRequest(request_id=f"cmpl-{uuid.uuid4().hex[:24]}",
                              sampling=body.sampling(default_max_tokens, controller.n_ctx),
                              **body.prompt_fields())
        return await _answer(controller, req, body, request, chat=False)

    @authed.get(f"/v1{WINDOWS_PATH}/probe/{{label}}")
    async def probe_window(label: str):
        wf = await controller.probe_window(label)
        if wf is None:
            raise ApiError(404, f"'{label}' is not a probe window of this model", code="window_not_found")
        return wf.model_dump()

    @authed.get(f"/v1{WINDOWS_PATH}/{{sha256}}")
    async def window(sha256: str):
        path = controller.window_file(sha256) if re.fullmatch(SHA256, sha256) else None
        if path is None:
            raise ApiError(404, "no window file of the current plan has this sha256", code="window_not_found")
        return FileResponse(path, media_type="application/octet-stream", filename=f"{sha256}.gguf")

    app.include_router(authed)
    return app


def _model_card(controller: "Controller") -> dict:
    return {"id": controller.model_id, "object": "model", "created": int(controller.started),
            "owned_by": "homering"}


def _usage(done: StreamEvent) -> dict:
    p, c = len(done.prompt_token_ids or []), len(done.token_ids or [])
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def _answer(controller: "Controller", req: GenerateRequest, body: _Body, request: Request, *, chat: bool):
    """Run ``req`` and answer as one JSON object or as server-sent events."""
    from homering.cluster.controller import RequestError

    events = controller.submit(req)
    try:
        first = await events.__anext__()  # admission errors surface here, before any byte is sent
    except RequestError as exc:
        await events.aclose()
        raise ApiError(exc.status, str(exc), code=exc.code) from None
    except StopAsyncIteration:
        raise ApiError(500, "the cluster ended the request without an answer") from None
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    async def all_events():
        yield first
        async for ev in events:
            yield ev

    if body.stream:
        return StreamingResponse(_sse(all_events(), events, req.request_id, kind, created, controller.model_id, chat,
                                      body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect() -> tuple[str, StreamEvent]:
        text = ""
        async for ev in all_events():
            if ev.type == "error":
                raise ApiError(500, ev.error or "the cluster failed")
            text += ev.text
            if ev.type == "done":
                return text, ev
        raise ApiError(500, "the stream ended without a final event")

    async with contextlib.aclosing(events):
        text, done = await _unless_disconnected(request, collect())
    choice: dict[str, Any] = {"index": 0, "finish_reason": _finish(done.finish_reason), "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": req.request_id, "object": kind, "created": created, "model": controller.model_id,
            "choices": [choice], "usage": _usage(done), "system_fingerprint": controller.fingerprint}


async def _unless_disconnected(request: Request, coro):
    """Await ``coro``, cancelling it if the HTTP client goes away first (its sequence is then freed)."""
    task = asyncio.ensure_future(coro)

    async def watch():
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


async def _sse(stream, events, rid: str, kind: str, created: int, model: str, chat: bool, include_usage: bool):
    """Server-sent events: one ``data: {chunk}`` per token, the final chunk, then ``data: [DONE]``."""
    obj = f"{kind}.chunk" if chat else kind

    def chunk(delta_or_text: str | None, finish: str | None, *, first: bool = False, usage=None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if delta_or_text is not None:
                delta["content"] = delta_or_text
            choice["delta"] = delta
        else:
            choice["text"] = delta_or_text or ""
        out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            out["usage"] = usage
        return f"data: {json.dumps(out)}\n\n"

    async with contextlib.aclosing(events):
        if chat:
            yield chunk("", None, first=True)
        async for ev in stream:
            if ev.type == "error":
                err = {"error": {"message": ev.error or "the cluster failed", "type": "server_error",
                                 "param": None, "code": None}}
                yield f"data: {json.dumps(err)}\n\n"
                break
            if ev.type == "token":
                if ev.text:
                    yield chunk(ev.text, None)
                continue
            if ev.text:
                yield chunk(ev.text, None)
            yield chunk(None, _finish(ev.finish_reason)) if chat else chunk("", _finish(ev.finish_reason))
            if include_usage:
                out = {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                       "usage": _usage(ev)}
                yield f"data: {json.dumps(out)}\n\n"
            break
        yield "data: [DONE]\n\n"


def cluster_report(controller: "Controller") -> dict:
    """``GET /v1/cluster``: the agents, the plan (predicted and measured ms/token) and the broker."""
    plan = controller.plan
    in_ring = {a.name: a for a in plan.ring} if plan else {}
    agents = []
    for name, prof in sorted(controller.profiles.items()):
        status = controller.statuses.get(name)
        st = controller.agent_stats.get(name)
        pa = in_ring.get(name)
        link = controller.links.get(name)
        agents.append({
            "name": name, "host": prof.host, "pid": prof.pid, "data_port": prof.data_port,
            "status": status.state if status else "unknown",
            "head": bool(plan and plan.head.name == name),
            "in_plan": pa is not None,
            "windows": [w.model_dump() for w in pa.windows] if pa else [],
            "mode": pa.mode if pa else None,
            "profile": prof.device.model_dump() if prof.device else None,
            "link_ms": link[0] if link else None, "link_mbps": link[1] if link else None,
            "stats": st.model_dump() if st else None,
        })
    return {
        "model": controller.model_id,
        "state": controller.state,
        "broker": str(controller.broker),
        "n_ctx": controller.n_ctx,
        "n_parallel": controller.n_parallel,
        "requests_in_flight": len(controller.in_flight),
        "queue_depth": controller.sequences.queue_depth,
        "agents": agents,
        "plan": None if plan is None else {
            "plan_id": plan.plan_id, "planner": plan.planner, "k": plan.k, "n_layers": plan.n_layers,
            "ring": [a.name for a in plan.ring], "dropped": plan.dropped, "head": plan.head.name,
            "predicted_ms_per_token": plan.predicted_ms_per_token,
            "measured_ms_per_token": controller.measured_ms_per_token,
        },
    }


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the controller's process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve(controller: "Controller", host: str, port: int):
    """Start the API on the running loop; returns ``(server, task)`` once it listens.

    Raises:
        HomeringError: the port could not be bound.
    """
    from homering.errors import HomeringError

    import socket

    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise HomeringError(f"the API cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    config = uvicorn.Config(create_app(controller, api_key=controller.api_key), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="off")
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            raise HomeringError(f"the API could not listen on {host}:{port} (is the port in use?)")
        await asyncio.sleep(0.02)
    return server, task

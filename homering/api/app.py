"""The controller's HTTP API: the FastAPI app (served by uvicorn on the controller's loop) and its document.

Routes, by router: :mod:`homering.api.openai` (``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``), :mod:`homering.api.embeddings` (``POST /v1/embeddings``), :mod:`homering.api.ollama`
(Ollama's ``/api/*``) and :mod:`homering.api.anthropic`
(``POST /v1/messages``), both through the OpenAI routes (:mod:`homering.api.bridge`), :mod:`homering.api.webui`
(the web UI at ``/``), :mod:`homering.api.cluster` (``GET /v1/cluster``, ``GET /health``),
:mod:`homering.api.metrics` (``GET /metrics``, Prometheus) and :mod:`homering.api.windows` (window files for
agents without the model). Every router reads the cluster through the
:class:`~homering.api.view.ClusterView` protocol. Errors are OpenAI error objects
(:mod:`homering.api.errors`).

With an API key configured, every ``/v1/*`` route and ``/metrics`` require ``Authorization: Bearer <key>``
(the :func:`~homering.api.errors.require_api_key` dependency); ``/health`` stays open for health checks.

The OpenAPI document (``/openapi.json``) says exactly what the server does: every route lists the statuses it
answers with the error object's schema (no FastAPI 422: request validation errors are 400s), the streams'
events, this server's limits (``max_tokens`` up to the context, prompt token ids below the vocabulary size),
and, with an API key, the 401s and the bearer scheme.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from homering.api import anthropic, cluster, embeddings, metrics, ollama, openai, responses_api, webui, windows
from homering.api.errors import ApiError, install_error_handlers, require_api_key
from homering.api.names import model_aliases
from homering.api.responses import STREAM_CHUNKS
from homering.api.view import ClusterView
from homering.errors import HomeringError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: refuse a request body larger than ``limit()`` bytes with a 413 error object, before
    it is read whole or parsed (by its Content-Length, or while a chunked body streams in).

    A body that cannot fit the context anyway costs nothing to refuse this way; parsing and
    validating it first (10 MB: 3.4 s on the controller's event loop) would delay the heartbeats.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], limit: Callable[[], int]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limit()
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await self._refuse(send, limit)
        seen, refused = 0, False

        async def counted() -> Message:  # a chunked body: count while it streams in; past the limit, answer
            nonlocal seen, refused  # and hang up
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    await self._refuse(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:  # what the app answers after that goes nowhere
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        await ApiError(
            413,
            f"the request body is larger than {limit} bytes, more than the context could hold",
            code="request_too_large",
        ).response()({"type": "http"}, None, send)  # type: ignore[arg-type]


def body_limit(view: ClusterView) -> int:
    """The largest request body worth reading, bytes: the context's tokens at the longest token's text, each
    character JSON-escaped (``\\uXXXX``: 6 bytes), plus 64 KiB for the rest of the request."""
    tokenizer = getattr(view, "tokenizer", None)
    per_token = getattr(tokenizer, "max_token_bytes", 64) if tokenizer is not None else 64
    return view.n_ctx * per_token * 6 + (64 << 10)


def create_app(view: ClusterView, *, default_max_tokens: int = 256, api_key: str | None = None) -> FastAPI:
    """The FastAPI application serving ``view``'s cluster.

    With ``api_key`` every route but ``/health`` requires it (see :func:`~homering.api.errors.require_api_key`).
    ``max_tokens`` left out of a request is ``default_max_tokens`` (bounded by the context).
    """
    app = FastAPI(title="homering", description="OpenAI-compatible API of a homering cluster", version="1")
    app.state.api_key = api_key
    install_error_handlers(app)
    auth = [Depends(require_api_key)]
    app.include_router(cluster.router(view, default_max_tokens=default_max_tokens, auth=auth))
    app.include_router(metrics.router(view, auth=auth))
    app.include_router(openai.router(view, default_max_tokens=default_max_tokens, auth=auth))
    app.include_router(responses_api.router(view, default_max_tokens=default_max_tokens, auth=auth))
    app.include_router(embeddings.router(view, auth=auth))
    app.include_router(windows.router(view, auth=auth))
    app.include_router(ollama.router(view, auth=auth))
    app.include_router(anthropic.router())
    webui.install(app)
    app.add_middleware(BodyLimit, limit=lambda: body_limit(view))
    app.openapi = lambda: _openapi(app, view)  # type: ignore[method-assign]
    return app


def _limit_bodies(schemas: dict[str, Any], view: ClusterView) -> None:
    """Name the served model and bound ``max_tokens`` by the context and prompt token ids by the vocabulary."""
    n_ctx = getattr(view, "n_ctx", None)
    served = list(model_aliases(view))
    for body in ("ChatCompletionBody", "CompletionBody", "ResponsesBody"):
        props = schemas.get(body, {}).get("properties", {})
        if "model" in props:  # the model's aliases; any other name gets a 404 (model_not_found)
            props["model"]["enum"] = served
        n_prop = props.get("n", {})
        for variant in n_prop.get("anyOf", [n_prop]):  # n: at most the sequences (more get a 400)
            if variant.get("type") == "integer" and getattr(view, "n_parallel", None):
                variant["maximum"] = min(variant.get("maximum", view.n_parallel), view.n_parallel)
        for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            for variant in props.get(field, {}).get("anyOf", []):
                if variant.get("type") == "integer" and n_ctx:
                    variant["maximum"] = min(variant.get("maximum", n_ctx), n_ctx)
    n_vocab = getattr(getattr(view, "tokenizer", None), "n_vocab", None)
    for variant in schemas.get("CompletionBody", {}).get("properties", {}).get("prompt", {}).get("anyOf", []):
        if variant.get("items", {}).get("type") == "integer" and n_vocab:
            variant["items"]["maximum"] = n_vocab - 1


def _openapi(app: FastAPI, view: ClusterView) -> dict[str, Any]:
    """The app's OpenAPI document (built once): FastAPI's, made to say what the server does.

    FastAPI documents a 422 for every route with parameters; this app answers
    validation errors with 400 (each route documents its statuses). The streams'
    chunk models join the components; ``model`` names the served model (others get
    a 404), ``max_tokens`` is bounded by the context and prompt token ids by the
    vocabulary; with an API key, the ``/v1/*`` routes and ``/metrics`` get the
    bearer scheme and a 401.
    """
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    _, extra = models_json_schema(
        [(m, "serialization") for m in STREAM_CHUNKS], ref_template="#/components/schemas/{model}"
    )
    for name, schema in extra.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _limit_bodies(schemas, view)
    keyed = bool(getattr(app.state, "api_key", None))
    if keyed:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "the cluster's API key"}
        }
    unauthorized = {
        "description": "a missing or wrong API key",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for path, item in doc["paths"].items():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
            if keyed and path != "/health":
                op["security"] = [{"bearer": []}]
                op["responses"]["401"] = unauthorized
    app.openapi_schema = doc
    return doc


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the controller's process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


async def serve(view: ClusterView, host: str, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """Start the API of ``view``'s cluster (with its ``api_key``) on the running loop; returns
    ``(server, task)`` once it listens.

    Raises:
        HomeringError: the port could not be bound.
    """
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise HomeringError(f"the API cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    app = create_app(view, api_key=view.api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            raise HomeringError(f"the API could not listen on {host}:{port} (is the port in use?)")
        await asyncio.sleep(0.02)
    return server, task

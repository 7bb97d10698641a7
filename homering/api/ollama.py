"""The Ollama-compatible API on the controller's port: ``/api/version``, ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/chat``, ``/api/generate`` and ``/api/embed``.

One mechanism, two wire formats: ``/api/chat``, ``/api/generate`` and ``/api/embed`` are translated
(:mod:`homering.api.ollama_schemas`) into OpenAI requests that run through the OpenAI routes in process
(:mod:`homering.api.bridge`), and their answers are translated back: one JSON object, or with ``stream`` (the
default) NDJSON, one object per text delta and a last one with ``done: true``, the ``done_reason`` and the
counts and durations (ns). Errors are Ollama's ``{"error": "<message>"}`` with the HTTP status, the field
named in the message; one in the middle of a stream is an ``{"error": …}`` line. The model reads are of the
:class:`~homering.api.view.ClusterView` protocol.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse, StreamingResponse

from homering.api import ollama_schemas as schemas
from homering.api.bridge import OpenAIError, Piece, answer_piece, error_route, openai_json, openai_stream, stream_pieces
from homering.api.errors import ApiError
from homering.api.view import ClusterView
from homering.errors import HomeringError
from homering.models.gguf_file import read_gguf

OLLAMA_VERSION = "0.12.0"
"""The Ollama API version whose shapes this server follows (what ``/api/version`` answers)."""
NDJSON = "application/x-ndjson"


def render_error(status: int, message: str, param: str | None, code: str | None) -> JSONResponse:
    """An error as Ollama answers it: ``{"error": "<message>"}`` with the HTTP ``status``."""
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return JSONResponse(status_code=status, content={"error": message})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


@lru_cache(maxsize=4)
def _gguf_details(path: str, mtime: float) -> dict[str, Any]:
    """Ollama's ``details`` and ``model_info`` of a GGUF file, from its header (cached by file and mtime)."""
    gf = read_gguf(path)
    arch = gf.arch
    n_params = sum(_product(t.dims) for t in gf.tensors)
    quant = re.search(r"(?i)(I?Q\d[_A-Z0-9]*|F16|BF16|F32)(?=\.gguf$)", path)
    info = {"general.architecture": arch, "general.parameter_count": n_params}
    for key in ("general.name", f"{arch}.block_count", f"{arch}.context_length", f"{arch}.embedding_length"):
        if (value := gf.get(key)) is not None:
            info[key] = value
    details = {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch],
        "parameter_size": f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.0f}M",
        "quantization_level": quant.group(1).upper() if quant else "",
    }
    return {"details": details, "model_info": info}


def _product(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _facts(view: ClusterView) -> tuple[float, int, dict[str, Any]]:
    """``(mtime, size, {"details", "model_info"})`` of the served file; one that cannot be read (gone, or not
    GGUF) gives ``(started, 0, …)`` with empty facts rather than a failed request."""
    try:
        stat = view.model_path.stat()
        return stat.st_mtime, stat.st_size, _gguf_details(str(view.model_path), stat.st_mtime)
    except (OSError, ValueError, HomeringError):
        return view.started, 0, {"details": {"format": "gguf"}, "model_info": {}}


def _model_entry(view: ClusterView) -> dict[str, Any]:
    """The served model as ``/api/tags`` and ``/api/ps`` list it."""
    mtime, size, facts = _facts(view)
    return {
        "name": view.model_id,
        "model": view.model_id,
        "modified_at": datetime.fromtimestamp(mtime, timezone.utc).isoformat().replace("+00:00", "Z"),
        "size": size,
        "digest": view.fingerprint or "",
        "details": facts["details"],
    }


async def _check_model(request: Request, name: str) -> None:
    """Raise the OpenAI route's 404 (:class:`~homering.api.bridge.OpenAIError`) unless ``name`` is a name of the
    served model: ``GET /v1/models/{name}``, so that every API takes the same names."""
    await openai_json(request, f"/v1/models/{quote(schemas.model_name(name), safe='')}", None)


def router(view: ClusterView, *, auth: Sequence[Depends] = ()) -> APIRouter:
    """The Ollama routes of ``view``'s cluster, behind ``auth``; errors in Ollama's format."""
    routes = APIRouter(dependencies=list(auth), route_class=error_route(render_error), include_in_schema=False)

    @routes.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": OLLAMA_VERSION}

    @routes.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [_model_entry(view)]}

    @routes.get("/api/ps")
    async def ps() -> dict[str, Any]:
        if not view.ready:
            return {"models": []}
        entry = _model_entry(view) | {
            "expires_at": "2318-01-01T00:00:00Z",
            "size_vram": 0,
            "context_length": view.n_ctx,
        }
        return {"models": [entry]}

    @routes.post("/api/show")
    async def show(body: schemas.ShowBody, request: Request) -> dict[str, Any]:
        await _check_model(request, body.model_name())
        return _show(view)

    @routes.post("/api/chat")
    async def chat(body: schemas.ChatBody, request: Request):
        return await _generation(request, "/v1/chat/completions", schemas.chat_request(body), body.model, chat=True)

    @routes.post("/api/generate")
    async def generate(body: schemas.GenerateBody, request: Request):
        if not body.prompt and not body.system:  # Ollama's way to load a model: nothing to generate
            await _check_model(request, body.model)
            return {"model": body.model, "created_at": _now(), "response": "", "done": True, "done_reason": "load"}
        path, openai = schemas.generate_request(body)
        return await _generation(request, path, openai, body.model, chat=False)

    @routes.post("/api/embed")
    async def embed(body: schemas.EmbedBody, request: Request) -> dict[str, Any]:
        t0 = time.perf_counter_ns()
        try:
            answer = await openai_json(request, "/v1/embeddings", schemas.embed_request(body))
        except OpenAIError as exc:
            if exc.status == 404 and exc.param is None:  # no such route, not an unknown model
                raise ApiError(501, "embed: this server has no embeddings (no /v1/embeddings route)") from None
            raise
        vectors = [d["embedding"] for d in sorted(answer["data"], key=lambda d: d.get("index", 0))]
        return {
            "model": body.model,
            "embeddings": vectors,
            "total_duration": time.perf_counter_ns() - t0,
            "load_duration": 0,
            "prompt_eval_count": (answer.get("usage") or {}).get("prompt_tokens", 0),
        }

    return routes


def _show(view: ClusterView) -> dict[str, Any]:
    """``/api/show``'s answer: the model's details and ``model_info`` (its GGUF header), its capabilities."""
    _, _, facts = _facts(view)
    return {
        "modelfile": f"FROM {view.model_path.name}\n",
        "parameters": f"num_ctx {view.n_ctx}",
        "template": "{{ .Prompt }}",
        "details": facts["details"],
        "model_info": facts["model_info"] | {"homering.context_length": view.n_ctx},
        "capabilities": _capabilities(),
        "modified_at": _model_entry(view)["modified_at"],
    }


def _capabilities() -> list[str]:
    """What the served model can do here: completion, and tools where the OpenAI path takes them."""
    from homering.api.schemas import ChatCompletionBody

    return ["completion", *(["tools"] if "tools" in ChatCompletionBody.model_fields else [])]


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments a JSON string) as Ollama's (arguments an object)."""
    out = []
    for call in calls:
        fn = call.get("function") or {}
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = {"_raw": fn.get("arguments")}
        out.append({"function": {"name": fn.get("name", ""), "arguments": args}})
    return out


def _final(model: str, last: Piece, t0: int, t_first: int | None, *, chat: bool) -> dict[str, Any]:
    """The last object of an answer: ``done``, the reason, the counts and the durations (ns)."""
    now = time.perf_counter_ns()
    first = t_first if t_first is not None else t0
    out: dict[str, Any] = {"model": model, "created_at": _now()}
    if chat:
        out["message"] = {"role": "assistant", "content": last.text}
        if last.tool_calls:
            out["message"]["tool_calls"] = _tool_calls(last.tool_calls)
    else:
        out["response"] = last.text
    return out | {
        "done": True,
        "done_reason": "length" if last.finish == "length" else "stop",
        "total_duration": now - t0,
        "load_duration": 0,
        "prompt_eval_count": last.usage.get("prompt_tokens", 0),
        "prompt_eval_duration": first - t0,
        "eval_count": last.usage.get("completion_tokens", 0),
        "eval_duration": now - first,
    }


async def _generation(request: Request, path: str, openai: dict[str, Any], model: str, *, chat: bool):
    """Run a translated request: one JSON object, or the NDJSON stream."""
    t0 = time.perf_counter_ns()
    if not openai["stream"]:
        return _final(model, answer_piece(await openai_json(request, path, openai)), t0, None, chat=chat)
    pieces = stream_pieces(await openai_stream(request, path, openai))
    return StreamingResponse(_ndjson(pieces, model, t0, chat=chat), media_type=NDJSON)


async def _ndjson(pieces: AsyncIterator[Piece], model: str, t0: int, *, chat: bool) -> AsyncIterator[str]:
    """The NDJSON stream: one object per text delta, then the final one (or an ``error`` line)."""
    t_first: int | None = None
    async for piece in pieces:
        if piece.error is not None:
            yield json.dumps({"error": piece.error}) + "\n"
            return
        if piece.text:
            t_first = t_first or time.perf_counter_ns()
            content = {"message": {"role": "assistant", "content": piece.text}} if chat else {"response": piece.text}
            yield json.dumps({"model": model, "created_at": _now(), **content, "done": False}) + "\n"
        else:
            yield json.dumps(_final(model, piece, t0, t_first, chat=chat)) + "\n"

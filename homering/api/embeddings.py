"""``POST /v1/embeddings`` (OpenAI's embeddings API): each input's mean-pooled final hidden state from the ring.

The served models are generative: they have no pooling layer of their own. An input's vector is the mean, over
its tokens, of the last layer's hidden state after the output norm (what the LM head would read), computed by
the ring like any prefill (:mod:`homering.agent.embedding`); ``n_embd`` floats (576 for SmolLM2-135M). It
is a usable sentence vector, not one trained for retrieval as a dedicated embedding model's is.

Each input of a list is one cluster request (:class:`~homering.wire.GenerateRequest` with ``embed``), run in
groups as large as the free sequences. ``encoding_format`` ``float`` (a list of numbers) or ``base64`` (the
little-endian float32 bytes, which the OpenAI SDK asks for by default). Errors are OpenAI error objects.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.params import Depends
from pydantic import BaseModel, ConfigDict, Field

from homering.api.answer import admitted, unless_disconnected
from homering.api.errors import ApiError
from homering.api.names import resolve_model
from homering.api.responses import error
from homering.api.schemas import INTEGRAL
from homering.api.view import ClusterView
from homering.wire import EventType, GenerateRequest, StreamEvent

MAX_INPUTS = 2048
"""The most inputs one request may hold (OpenAI's bound)."""


class EmbeddingBody(BaseModel):
    """``POST /v1/embeddings``: ``input`` is one string, a list of strings (each non-empty), token ids, or a list
    of token-id lists (OpenAI's four forms)."""

    model_config = ConfigDict(extra="allow", strict=True)  # OpenAI fields this server ignores (user) are accepted

    model: str
    input: str | list[str] | list[Annotated[int, INTEGRAL]] | list[list[Annotated[int, INTEGRAL]]] = Field(
        json_schema_extra={
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "maxItems": MAX_INPUTS,
                },
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                    "minItems": 1,
                    "maxItems": MAX_INPUTS,
                },
            ]
        }
    )
    encoding_format: Literal["float", "base64"] = "float"

    def inputs(self) -> list[dict[str, Any]]:
        """The inputs as :class:`~homering.wire.GenerateRequest` fields, one dict per input: ``prompt`` (a
        string) or ``prompt_token_ids`` (the controller checks them against the vocabulary).

        Raises:
            ApiError: 400 ``input``: empty, an empty string or token list, or more than :data:`MAX_INPUTS`.
        """
        raw = self.input
        items: list[Any] = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        if not items or len(items) > MAX_INPUTS:
            raise ApiError(400, f"input: give 1 to {MAX_INPUTS} inputs", param="input")
        if any(not t for t in items):
            raise ApiError(400, "input: an input is empty", param="input")
        return [{"prompt": t} if isinstance(t, str) else {"prompt_token_ids": list(t)} for t in items]


class EmbeddingItem(BaseModel):
    """One input's vector: floats, or (``encoding_format`` ``base64``) their float32 little-endian bytes."""

    object: Literal["embedding"]
    index: int = Field(ge=0)
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    """The inputs' tokens (embeddings generate none)."""

    prompt_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)


class EmbeddingList(BaseModel):
    """``POST /v1/embeddings``'s answer."""

    object: Literal["list"]
    data: list[EmbeddingItem]
    model: str
    usage: EmbeddingUsage


def router(view: ClusterView, *, auth: Sequence[Depends] = ()) -> APIRouter:
    """``POST /v1/embeddings`` on ``view``'s cluster, behind ``auth``."""
    routes = APIRouter(dependencies=list(auth))

    @routes.post(
        "/v1/embeddings",
        response_model=None,
        responses={
            200: {"model": EmbeddingList, "description": "one vector per input, in order"},
            400: error("a malformed request (invalid JSON, a field's type, an empty input, dimensions)"),
            404: error("this cluster does not serve the model"),
            413: error("an input does not fit the context"),
            429: error("every sequence is busy and the queue is full"),
            500: error("the cluster failed the request"),
            503: error("no plan is ready (the agents are joining, loading or re-planning)"),
        },
    )
    async def embeddings(body: EmbeddingBody, request: Request):
        resolve_model(view, body.model)
        inputs = body.inputs()
        dims = (body.model_extra or {}).get("dimensions")
        rid = f"embd-{uuid.uuid4().hex[:20]}"
        reqs = [GenerateRequest(request_id=f"{rid}-{i}", embed=True, **t) for i, t in enumerate(inputs)]
        dones: list[StreamEvent] = []
        while len(dones) < len(reqs):  # in groups as large as the free sequences: no input waits in the queue
            free = max(1, view.sequences.n - view.sequences.in_use)
            dones += await _run(view, reqs[len(dones) : len(dones) + free], request)
        vectors = [np.asarray(d.embedding, dtype=np.float32) for d in dones]
        if dims is not None and dims != vectors[0].shape[0]:
            raise ApiError(400, f"dimensions: this model's vectors have {vectors[0].shape[0]}", param="dimensions")
        n = sum(len(d.prompt_token_ids or []) for d in dones)
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                for i, v in enumerate(vectors)
            ],
            "model": view.model_id,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    return routes


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    """A vector as JSON numbers, or as base64 of its float32 little-endian bytes."""
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return [float(x) for x in vector]


async def _run(view: ClusterView, reqs: list[GenerateRequest], request: Request) -> list[StreamEvent]:
    """Run embed requests at once; their ``done`` events, in order.

    Raises:
        ApiError: refused (its status), or failed (500).
    """
    streams = await admitted(view, reqs)
    async with contextlib.AsyncExitStack() as stack:
        for s in streams:
            stack.push_async_callback(s.aclose)  # type: ignore[attr-defined]
        return list(await unless_disconnected(request, asyncio.gather(*(_done(s) for s in streams))))


async def _done(events: AsyncIterator[StreamEvent]) -> StreamEvent:
    async for ev in events:
        if ev.type == EventType.ERROR:
            raise ApiError(500, ev.error or "the cluster failed")
        if ev.type == EventType.DONE:
            if ev.embedding is None:
                raise ApiError(500, "the cluster answered without an embedding")
            return ev
    raise ApiError(500, "the stream ended without a final event")

"""The OpenAI-compatible routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``.

Both generation routes answer one JSON object, or with ``stream`` server-sent events: one chunk per text delta,
the final chunk (with ``stream_options.include_usage`` one more with the usage), then ``data: [DONE]``; a cluster
failure mid-stream is an error object event before ``[DONE]``. A client that goes away cancels its request (its
KV sequence is freed). The request bodies are :mod:`homering.api.schemas`'s; the errors
:mod:`homering.api.errors`'s.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.params import Depends

from homering.api.answer import Shape, answer
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
from homering.api.schemas import ChatCompletionBody, CompletionBody
from homering.api.structured import format_grammar
from homering.api.tools import plan_chat
from homering.api.view import ClusterView
from homering.wire import GenerateRequest

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
        reqs, shape = chat_requests(view, body, default_max_tokens)
        return await answer(view, reqs, shape, request, stream=body.stream)

    @routes.post("/v1/completions", response_model=None, responses=generation_responses(Completion, CompletionChunk))
    async def completions(body: CompletionBody, request: Request):
        check_model(body.model)
        top = body.logprobs
        base = GenerateRequest(
            request_id=f"cmpl-{uuid.uuid4().hex[:24]}",
            sampling=body.sampling(default_max_tokens, view.n_ctx),
            speculative=body.speculative.settings() if body.speculative else None,
            grammar=format_grammar(body.response_format, body.grammar),
            logprobs=top,
            **body.prompt_fields(),
        )
        shape = Shape(chat=False, logprobs=top is not None, include_usage=body.include_usage)
        return await answer(view, choices(view, base, body.n), shape, request, stream=body.stream)

    return routes


def _model_card(view: ClusterView) -> dict[str, Any]:
    return {
        "id": view.model_id,
        "object": "model",
        "created": int(view.started),
        "owned_by": "homering",
        "aliases": list(model_aliases(view)[1:]),
    }


def chat_template(view: ClusterView) -> str:
    """The served model's chat template ("" until the controller has read the vocabulary)."""
    return str(getattr(view.tokenizer, "chat_template", "") or "")


def chat_requests(
    view: ClusterView, body: ChatCompletionBody, default_max_tokens: int
) -> tuple[list[GenerateRequest], Shape]:
    """An OpenAI-shaped chat request as the cluster's requests (one per choice, ``n``) and the answer's shape.

    Tools, ``tool_choice``, ``response_format`` and ``grammar`` go through
    :func:`~homering.api.tools.plan_chat`; ``logprobs``/``top_logprobs`` become the head's ``logprobs``.

    Raises:
        ApiError: 400, a bad field (named in ``param``), or ``n`` over the free sequences.
    """
    plan = plan_chat(body, chat_template(view))
    top = (body.top_logprobs or 0) if body.logprobs else None  # top_logprobs alone: no logprobs
    base = GenerateRequest(
        request_id=f"chatcmpl-{uuid.uuid4().hex[:20]}",
        messages=plan.messages,
        tools=plan.tools,
        grammar=plan.grammar,
        logprobs=top,
        sampling=body.sampling(default_max_tokens, view.n_ctx),
        speculative=body.speculative.settings() if body.speculative else None,
    )
    shape = Shape(chat=True, plan=plan, logprobs=top is not None, include_usage=body.include_usage)
    return choices(view, base, body.n), shape


def choices(view: ClusterView, base: GenerateRequest, n: int) -> list[GenerateRequest]:
    """``n`` requests for ``n`` choices: ``base``, then copies with ids ``<id>-1`` … and seeds ``seed + i``.

    Raises:
        ApiError: 400 ``n``, more choices than the cluster has free sequences.
    """
    if n == 1:
        return [base]
    seqs = view.sequences
    free = seqs.n - seqs.in_use
    if n > free:
        raise ApiError(400, f"n: {n} choices need {n} free sequences; the cluster has {free} of {seqs.n}", param="n")
    out = [base]
    for i in range(1, n):
        s = base.sampling
        sampling = s.model_copy(update={"seed": (s.seed + i) % 2**32 if s.seed is not None else None})
        out.append(base.model_copy(update={"request_id": f"{base.request_id}-{i}", "sampling": sampling}))
    return out

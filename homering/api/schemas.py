"""The request bodies of the generation routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``.

The shapes follow OpenAI's API reference for chat completions and (legacy) completions; fields this server does
not use (``user``, ``logit_bias``, …) are accepted and ignored. Structured output (``response_format``,
``grammar``) and tools (``tools``, ``tool_choice``) are :mod:`homering.api.formats`'s shapes. Extensions, as in
llama.cpp's server: ``top_k``, ``min_p`` and ``ignore_eos``. Sampling fields a client leaves out take llama.cpp's
defaults (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05), not OpenAI's (temperature 1, no top-k), which make
small models ramble. Types are strict ("5" is no integer), and text must be valid Unicode (no lone surrogates).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError

from homering.api.errors import ApiError
from homering.api.formats import ResponseFormat, ToolCall, ToolChoice, ToolDef
from homering.api.speculative import SpeculativeBody, fold_flat_keys
from homering.wire import Sampling

MAX_TOKENS_LIMIT = 1 << 20
"""The largest ``max_tokens`` any request may ask for (:class:`Sampling`'s bound); the context bounds it further."""
N_MAX = 16
"""The most answers (``n``) one request may ask for; the cluster's free sequences bound it further."""


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


def _integral(value: Any) -> Any:
    """A JSON number without a fraction as the integer it is (``16.0`` is 16, as JSON Schema's ``integer``
    says); anything else as it is, for the strict ``int`` to judge ("16" and true are no integers)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


INTEGRAL = BeforeValidator(_integral)


def _stop_list(v: str | list[str] | None) -> list[str]:
    """``stop`` as a list: a string is one stop sequence, null none."""
    return [v] if isinstance(v, str) else list(v or [])


class _Strict(BaseModel):
    # strict types: "5" is no integer and "yes" no boolean; OpenAI fields this server ignores
    # (user, logit_bias, …) are accepted
    model_config = ConfigDict(extra="allow", strict=True)


class GenerationBody(_Strict):
    """What both generation routes take: the model, sampling, stop sequences, ``stream``."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if (where := _lone_surrogate(data, "")) is not None:
            raise PydanticCustomError(
                "invalid_unicode",
                "{where}: a lone surrogate (e.g. \\ud800) is not valid Unicode text",
                {"where": where},
            )
        return data

    model: str
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), INTEGRAL] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT), INTEGRAL] | None = None
    # sampling fields a client leaves out (or sends as null) take llama.cpp's defaults (Sampling's)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="default 0.8")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="default 0.95")
    top_k: Annotated[int, Field(ge=0), INTEGRAL] | None = Field(default=None, description="default 40; 0 turns it off")
    min_p: float | None = Field(default=None, ge=0.0, le=1.0, description="default 0.05; 0 turns it off")
    seed: Annotated[int, Field(ge=0, le=2**32 - 1), INTEGRAL] | None = None
    stop: str | list[str] | None = Field(
        default=None,
        json_schema_extra={
            "anyOf": [  # _stops says "at most 4"
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": 4},
                {"type": "null"},
            ]
        },
    )
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    n: Annotated[int, Field(ge=1, le=N_MAX), INTEGRAL] = Field(
        default=1, description="answers (each on a KV sequence of its own; at most the free sequences)"
    )
    response_format: ResponseFormat | None = None
    grammar: str | None = Field(
        default=None,
        min_length=1,
        max_length=1 << 20,
        description="llama.cpp server's extension: a GBNF grammar (llama.cpp must parse it, else a 400)",
    )
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    ignore_eos: bool = False  # llama.cpp server's extension: generate max_tokens past end-of-generation
    speculative: SpeculativeBody | None = None  # llama-server's speculative.* (homering.api.speculative)

    @model_validator(mode="before")
    @classmethod
    def _speculative_keys(cls, data: Any) -> Any:
        return fold_flat_keys(data)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = _stop_list(v)
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
        max_tokens = self.max_completion_tokens or self.max_tokens or min(default_max, n_ctx or default_max)
        return Sampling(
            max_tokens=max_tokens,
            seed=self.seed,
            **chosen,
            stop=_stop_list(self.stop),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _ContentPart(_Strict):
    type: str = Field(json_schema_extra={"enum": ["text"]})  # others get a 400 (see _Message.text)
    text: str | None = None


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_ContentPart] | None = ""
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's: the call it answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            if any(p.type != "text" for p in self.content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionBody(GenerationBody):
    """``POST /v1/chat/completions``: the messages (text only) and the generation fields."""

    messages: list[_Message] = Field(min_length=1)
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), INTEGRAL] | None = None


PROMPT_SCHEMA: JsonDict = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
    ]
}
"""What ``prompt`` accepts: a non-empty string, a list of one, or token ids (below the vocabulary size, which
the app's document adds). Other values pass the model and get a 400 from :meth:`CompletionBody.prompt_fields`
or the controller, whose messages say more than a schema error would."""


class CompletionBody(GenerationBody):
    """``POST /v1/completions``: one prompt (text, or token ids) and the generation fields."""

    prompt: str | list[str] | list[Annotated[int, INTEGRAL]] = Field(json_schema_extra=PROMPT_SCHEMA)
    logprobs: Annotated[int, Field(ge=0, le=5), INTEGRAL] | None = None

    def prompt_fields(self) -> dict[str, Any]:
        """``prompt`` as :class:`~homering.wire.GenerateRequest` fields: ``prompt`` (one string) or
        ``prompt_token_ids``.

        Raises:
            ApiError: 400, a list of more (or fewer) than one string.
        """
        p = self.prompt
        if isinstance(p, str):
            return {"prompt": p}
        if p and all(isinstance(x, int) for x in p):
            return {"prompt_token_ids": list(p)}
        if len(p) != 1:
            raise ApiError(400, "give one prompt (a string, or a list of one string)", param="prompt")
        return {"prompt": p[0]}

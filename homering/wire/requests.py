"""Requests and their streams: what a client asks, what the controller orders the head, what comes back."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from homering.engine.drafting import Speculative
from homering.engine.sampling import Sampling
from homering.wire.base import NAME, Message, WireEnum


class EventType(WireEnum):
    """A :class:`StreamEvent`'s ``type`` (a ``str``: compares equal to its value)."""

    TOKEN = "token"
    DONE = "done"
    ERROR = "error"
    INTERRUPTED = "interrupted"


END_EVENTS = frozenset({EventType.DONE, EventType.ERROR, EventType.INTERRUPTED})
"""The event types that end an attempt's stream."""

__all__ = [
    "EventType",
    "END_EVENTS",
    "ChatMessage",
    "GenerateRequest",
    "GenerateJob",
    "StreamEvent",
    "CancelJob",
    "StreamReplay",
    "Sampling",
    "TokenLogprob",
    "LOGPROBS_MAX",
]

LOGPROBS_MAX = 20
"""The most alternatives a token's log-probabilities list (OpenAI's ``top_logprobs`` bound)."""


class ChatMessage(Message):
    """One message of a chat, as the chat template renders it.

    ``tool_calls`` (an assistant's, OpenAI's ``[{"id", "type": "function", "function": {"name", "arguments"}}]``
    with ``arguments`` parsed into an object, as Hugging Face chat templates expect), ``tool_call_id`` and
    ``name`` (a ``tool`` message's) are for templates that render tools.
    """

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class TokenLogprob(BaseModel):
    """A token's log-probability under the model (the log-softmax of the head's logits), its text and bytes,
    and (in ``top``) the most likely tokens at its position."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    token_id: int
    token: str
    bytes: list[int]
    logprob: float = Field(le=0.0)
    top: list[TokenLogprob] = Field(default_factory=list, max_length=LOGPROBS_MAX)


class GenerateRequest(Message):
    """A user's request to the controller: chat messages, a raw prompt, or prompt token ids (exactly one)."""

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str = Field(pattern=NAME)
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = Field(default=None, description="the prompt, already tokenized")
    sampling: Sampling = Sampling()
    speculative: Speculative | None = None
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="OpenAI tool definitions, for a chat template that renders them"
    )
    grammar: str | None = Field(default=None, description="GBNF: the answer must be in its language")
    logprobs: int | None = Field(
        default=None, ge=0, le=LOGPROBS_MAX, description="each token's log-probability, with this many alternatives"
    )
    embed: bool = Field(default=False, description="no tokens: the prompt's mean-pooled final hidden state")


class GenerateJob(Message):
    """The controller's order to the head: generate from these token ids in KV sequence ``seq_id``.

    The controller gives each request in flight its own sequence (0 …
    ``Plan.n_parallel`` - 1), so requests share the ring and every window's KV cache.
    """

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str = Field(pattern=NAME)
    plan_id: str
    seq_id: int = Field(ge=0, default=0)
    prompt_token_ids: list[int] = Field(min_length=1)
    sampling: Sampling
    attempt: int = Field(ge=0, default=0, description="0, then +1 each time the request resumes on a new ring")
    resume_token_ids: list[int] = Field(
        default_factory=list,
        description="tokens already streamed to the client by an earlier attempt: the head "
        "replays prompt + these through the ring to rebuild the KV caches, then goes on generating",
    )
    speculative: Speculative | None = Field(
        default=None, description="speculative decoding on the head (None: the head agent's --draft)"
    )
    grammar: str | None = Field(default=None, description="GBNF that constrains the sampled tokens")
    logprobs: int | None = Field(default=None, ge=0, le=LOGPROBS_MAX, description="as GenerateRequest's")
    embed: bool = Field(default=False, description="as GenerateRequest's")


class StreamEvent(Message):
    """One event of a request's stream: a text delta, the end, an error, or an interruption.

    ``interrupted`` (head → controller) says the ring broke (an agent was
    lost, or the controller re-planned) after the tokens in ``token_ids``
    were streamed; the controller then resumes the request on the new ring
    (a :class:`GenerateJob` with ``resume_token_ids``), and the client's
    stream goes on from there. ``index`` numbers an attempt's events 0, 1, …
    so that a receiver drops duplicates after a :class:`StreamReplay`.
    """

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str
    type: EventType
    attempt: int = 0
    index: int | None = None
    text: str = ""
    token_id: int | None = None
    logprob: TokenLogprob | None = None
    # done only
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    ttft_ms: float | None = None
    ms_per_token: float | None = None
    drafted: int | None = Field(default=None, description="draft tokens the head sent to be verified")
    accepted: int | None = Field(default=None, description="of which the target kept (speculative decoding)")
    trips: int | None = Field(default=None, description="verification trips around the ring (mean γ = drafted / trips)")
    embedding: list[float] | None = Field(
        default=None, description="an embed request's vector: the mean of the prompt's final hidden states (n_embd)"
    )
    # error only
    error: str | None = None


class CancelJob(Message):
    """The controller asks the head to stop a request.

    Its client went away: the head ends the stream with ``done`` and
    ``finish_reason = "cancelled"``. Or (``interrupt``) the ring lost an
    agent: the head ends it with ``interrupted`` and the tokens so far, and
    the controller resumes it elsewhere. Either way the sequence is freed.
    """

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str = Field(pattern=NAME)
    interrupt: bool = False


class StreamReplay(Message):
    """The controller asks the head to publish again a request's events from ``from_index`` on.

    Sent after the controller reconnects to the broker: events the head
    published while the controller was away were lost (stream events are not
    retained). The head keeps the events of its recent requests.
    """

    SIGNED: ClassVar[bool] = True
    LIVE: ClassVar[bool] = True

    request_id: str = Field(pattern=NAME)
    attempt: int = 0
    from_index: int = Field(ge=0, default=0)


# ------------------------------------------------------------------ data plane

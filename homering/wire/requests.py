"""Requests and their streams: what a client asks, what the controller orders the head, what comes back."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

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
]


class ChatMessage(Message):
    role: Literal["system", "user", "assistant"]
    content: str


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
    # done only
    token_ids: list[int] | None = None
    prompt_token_ids: list[int] | None = None
    finish_reason: Literal["stop", "length", "cancelled"] | None = None
    ttft_ms: float | None = None
    ms_per_token: float | None = None
    drafted: int | None = Field(default=None, description="draft tokens the head sent to be verified")
    accepted: int | None = Field(default=None, description="of which the target kept (speculative decoding)")
    trips: int | None = Field(default=None, description="verification trips around the ring (mean γ = drafted / trips)")
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

"""One request's state, in one object: :class:`RequestRun`; the requests this controller serves: :class:`Runs`.

A request is keyed once, by its id. Its :class:`RequestRun` holds the prompt's token ids, its KV
sequence, the tokens already streamed to its consumer, the order of its stream (attempts and event
indices, :class:`~homering.transport.streams.StreamOrder`), the head serving the current attempt
and the queue its events reach the consumer through, from admission until its sequence is free.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from homering.api.view import RequestRefused
from homering.engine.grammar import GrammarError
from homering.engine.tokenizer import Tokenizer
from homering.errors import HomeringError
from homering.transport.streams import StreamOrder
from homering.wire import GenerateJob, GenerateRequest, Plan, StreamEvent


class RequestError(RequestRefused, HomeringError):
    """A request the controller refuses (:class:`~homering.api.view.RequestRefused`: ``status`` is the HTTP
    status the API answers with, ``code`` the OpenAI error code)."""


@dataclass(eq=False)
class RequestRun:
    """One request, from the moment it holds a KV sequence until the sequence is free again.

    Attributes:
        request: what the client asked.
        prompt: the prompt's token ids.
        seq: its KV sequence (0 … n_parallel - 1) in every window.
        started: ``time.perf_counter()`` when it asked for a sequence (the latency metric's start).
        events: stream events for the consumer (:meth:`deliver` puts them in order).
        order: the stream's order: the current attempt and the next event index expected.
        sent: token ids yielded to the consumer so far (a resumed attempt replays them).
        head: the head serving the current attempt; None before the first and while waiting to resume.
        plan_id: the plan of the current attempt.
        waiting_since: the ready generation it waits from (for a plan to start or resume on), or None.
        admitted: it passed admission: its sequence is in use on the ring.
        reading: its consumer still reads ``events`` (False once it finished or left).
        abandoned: the consumer left while the head still runs it: the sequence frees when the head stops.
    """

    request: GenerateRequest
    prompt: list[int]
    seq: int
    started: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue[StreamEvent] = field(default_factory=asyncio.Queue)
    order: StreamOrder = field(default_factory=StreamOrder)
    sent: list[int] = field(default_factory=list)
    head: str | None = None
    plan_id: str | None = None
    waiting_since: int | None = None
    admitted: bool = False
    reading: bool = True
    abandoned: bool = False

    @property
    def request_id(self) -> str:
        """The client's id of the request (its stream's topic names it)."""
        return self.request.request_id

    @property
    def attempt(self) -> int:
        """0 for the first attempt, +1 each time the request resumes on a new ring."""
        return self.order.attempt

    @property
    def running(self) -> bool:
        """A head runs it now (it is admitted and not waiting to resume)."""
        return self.admitted and self.head is not None

    def job(self, plan: Plan) -> GenerateJob:
        """The order to ``plan``'s head: generate (or, for attempt > 0, resume after the tokens sent)."""
        return GenerateJob(
            request_id=self.request_id,
            plan_id=plan.plan_id,
            seq_id=self.seq,
            prompt_token_ids=self.prompt,
            sampling=self.request.sampling,
            attempt=self.attempt,
            resume_token_ids=list(self.sent),
            speculative=self.request.speculative,
            grammar=self.request.grammar,
            logprobs=self.request.logprobs,
            embed=self.request.embed,
        )

    def deliver(self, event: StreamEvent) -> bool:
        """Pass a head's event to the consumer, in order and once (:class:`StreamOrder`). True when some
        events are missing (lost in a broker outage): ask the head to replay them."""
        for ev in self.order.push(event):
            self.events.put_nowait(ev)
        return self.order.waiting

    def resume_as_next_attempt(self) -> None:
        """The ring broke: events of the attempt that ran are dropped from now on; the next one starts."""
        self.order.advance(self.order.attempt + 1)
        self.head = None


class Runs:
    """The requests this controller serves, by id (one :class:`RequestRun` each)."""

    def __init__(self) -> None:
        self._runs: dict[str, RequestRun] = {}

    def add(self, run: RequestRun) -> None:
        """Serve ``run`` (a request id names one run at a time)."""
        self._runs[run.request_id] = run

    def get(self, request_id: str) -> RequestRun | None:
        """The run of ``request_id``, or None when this controller does not serve it."""
        return self._runs.get(request_id)

    def remove(self, run: RequestRun) -> None:
        """``run`` is over (nothing happens when another run has its id by now)."""
        if self._runs.get(run.request_id) is run:
            del self._runs[run.request_id]

    def __iter__(self) -> Iterator[RequestRun]:
        return iter(list(self._runs.values()))

    def __len__(self) -> int:
        return len(self._runs)

    @property
    def in_flight(self) -> dict[str, int]:
        """Request id -> KV sequence of every admitted request (running, waiting to resume, or abandoned)."""
        return {r.request_id: r.seq for r in self._runs.values() if r.admitted}

    def at_boundary(self, generation: int) -> bool:
        """No request runs on the current plan and none is due to start on it (a join may re-plan now).

        Requests waiting since before the current plan became ready (``generation``) are due to
        start on it. Requests still waiting for a plan do not count, or a join and a resumption
        would wait for each other.
        """
        runs = self._runs.values()
        return not any(r.running for r in runs) and not any(
            r.waiting_since is not None and r.waiting_since < generation for r in runs
        )


def prompt_ids(tokenizer: Tokenizer, req: GenerateRequest, n_ctx: int) -> list[int]:
    """The prompt's token ids: the chat rendered with the model's template, the text tokenized, or the ids.

    Raises:
        RequestError: 400 for a malformed request, 413 when the prompt does not fit the context of
            ``n_ctx`` tokens.
    """
    if sum(x is not None for x in (req.messages, req.prompt, req.prompt_token_ids)) != 1:
        raise RequestError(400, "a request needs exactly one of 'messages', 'prompt' or 'prompt_token_ids'")
    # Before tokenizing (its cost grows faster than linearly with the special tokens in a text): a
    # lower bound of the tokens, as every message renders to one at least and no token stands for more
    # than max_token_bytes bytes of text. Token ids are counted as they are, below.
    texts = [m.content for m in req.messages] if req.messages is not None else [req.prompt or ""]
    least = max(len(req.messages or ()), sum(map(len, texts)) // tokenizer.max_token_bytes)
    if least >= n_ctx:
        raise RequestError(
            413,
            f"the prompt ({len(texts)} message(s), {sum(map(len, texts))} characters) "
            f"cannot fit the context of {n_ctx} tokens",
            code="context_length_exceeded",
        )
    try:
        if req.messages is not None:
            ids = tokenizer.chat_tokens([m.model_dump(exclude_none=True) for m in req.messages], tools=req.tools)
        elif req.prompt is not None:
            ids = tokenizer.tokenize(req.prompt, add_special=True, parse_special=True)
        else:
            ids = req.prompt_token_ids or []
            bad = [t for t in ids if not 0 <= t < tokenizer.n_vocab]
            if bad:
                raise RequestError(
                    400,
                    f"prompt_token_ids has {len(bad)} id(s) outside the vocabulary "
                    f"[0, {tokenizer.n_vocab}), e.g. {bad[0]}",
                )
    except RequestError:
        raise
    except HomeringError as exc:
        raise RequestError(400, str(exc)) from None
    except UnicodeError:
        raise RequestError(400, "the request's text is not valid Unicode (a lone surrogate?)") from None
    if not ids:
        raise RequestError(400, "the prompt is empty")
    if req.grammar is not None:
        try:
            tokenizer.check_grammar(req.grammar)
        except GrammarError as exc:
            raise RequestError(400, f"grammar: {exc}", param="grammar") from None
    if len(ids) >= n_ctx:
        raise RequestError(
            413,
            f"the prompt has {len(ids)} tokens but the context holds {n_ctx}: "
            f"shorten it or restart with a larger --ctx",
            code="context_length_exceeded",
        )
    return ids

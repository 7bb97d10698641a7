"""``homering chat`` and ``homering up``'s front ends: the interactive chat, the one-shot prompt of ``homering up
--prompt``, the headless ``homering up --no-chat``, and :func:`ask`, one request's answer gathered (and cancelled
on Ctrl-C). The terminal's pieces (line editor, Ctrl-C, tables) are in :mod:`homering.client.terminal`."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.text import Text

from homering.client.client import ClusterClient, new_request_id
from homering.client.terminal import (
    HELP,
    CtrlC,
    LineEditor,
    cluster_table,
    plan_table,
    read_line,
    sigint_calls,
    terminal_input,
)
from homering.errors import HomeringError
from homering.tasks import Tasks
from homering.transport import mqtt
from homering.wire import ChatMessage, ControllerStatus, EventType, GenerateRequest, Sampling, StreamEvent
from homering.wire.security import ClusterKey

CANCEL_RESEND_S = 1.0
"""How often :func:`ask` repeats a cancel until the answer ends (the request may still be queued)."""
CANCEL_WAIT_S = 30.0
"""How long :func:`ask` waits for a cancelled answer to end before it gives up on it."""


@dataclass
class Answer:
    """A finished answer: text, token ids and timings (from the head's ``done`` event)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    ttft_ms: float | None = None
    ms_per_token: float | None = None
    drafted: int | None = None  # speculative decoding: draft tokens verified, and kept
    accepted: int | None = None
    trips: int | None = None

    def add(self, event: StreamEvent) -> None:
        """Take the next event of the answer's stream.

        Raises:
            HomeringError: an ``error`` event (its message).
        """
        if event.type == EventType.ERROR:
            raise HomeringError(event.error or "the cluster failed")
        self.text += event.text
        if event.type == EventType.DONE:
            self.token_ids = event.token_ids or []
            self.prompt_token_ids = event.prompt_token_ids or []
            self.finish_reason = event.finish_reason
            self.ttft_ms = event.ttft_ms
            self.ms_per_token = event.ms_per_token
            self.drafted, self.accepted, self.trips = event.drafted, event.accepted, event.trips

    @property
    def cancelled(self) -> bool:
        """The head stopped the answer because it was asked to (:meth:`ClusterClient.cancel`)."""
        return self.finish_reason == "cancelled"


async def wait_ready_shown(client: ClusterClient, console: Console, timeout: float) -> ControllerStatus:
    """``client.wait_ready`` with a live status line on ``console`` and one line per finished stage.

    The stages are :meth:`ClusterClient.progress`'s (controller, agents, planning,
    loading windows); each is printed with the seconds it took once the next begins,
    so a slow start says where the time goes. Returns the controller's status.
    """
    t0 = last = time.perf_counter()
    current: str | None = None

    def stage_of(text: str) -> str:
        return text.split(":")[0].split(" (")[0].split(" over ")[0]

    with console.status("starting the cluster…") as line:

        def update() -> None:
            nonlocal last, current
            text = client.progress()
            stage = stage_of(text)
            if current is not None and stage != current:
                now = time.perf_counter()
                console.print(f"[dim]· {current}: {now - last:.1f} s[/]", highlight=False)
                last = now
            current = stage
            line.update(f"{text}…")

        status = await client.wait_ready(timeout, on_change=update)
    console.print(f"[dim]· ready in {time.perf_counter() - t0:.1f} s[/]", highlight=False)
    return status


async def headless(cluster: Any, api_url: str, ready_timeout: float = 300.0) -> int:
    """``homering up --no-chat``: wait until the cluster is ready, say where the API is, serve until Ctrl-C.

    ``cluster`` is the :class:`~homering.client.local.LocalCluster` (its ``broker``, ``key`` and ``check()``).
    """
    console = Console(stderr=True)
    async with ClusterClient(cluster.broker, key=cluster.key) as client:
        status = await wait_ready_shown(client, console, ready_timeout)
        n_agents = len(client.plan.ring) if client.plan else 0
        console.print(
            f"[bold]homering[/] · model [cyan]{status.model}[/] · {n_agents} agent(s) · "
            f"OpenAI API at [bold]{api_url}[/] · Ctrl-C stops"
        )
        while True:
            cluster.check()
            await asyncio.sleep(1.0)


def _deliver(
    event: StreamEvent, on_event: Callable[[StreamEvent], None] | None, on_text: Callable[[str], None] | None
) -> None:
    if on_event is not None:
        on_event(event)
    if on_text is not None and event.text:
        on_text(event.text)


async def ask(
    client: ClusterClient,
    request: GenerateRequest,
    on_text: Callable[[str], None] | None = None,
    *,
    stop: asyncio.Event | None = None,
    on_event: Callable[[StreamEvent], None] | None = None,
) -> Answer:
    """Send one request and gather the answer, calling ``on_text(delta)`` as tokens arrive (and
    ``on_event(event)`` on every event, a token's whose text is still empty too).

    Once ``stop`` is set the request is cancelled on the cluster: its head is told to stop
    (:meth:`ClusterClient.cancel`; again every :data:`CANCEL_RESEND_S` s, since a request still
    queued at the controller has not reached it), text that still arrives is not passed on, and
    the answer ends with the head's ``done`` event, ``finish_reason`` ``"cancelled"``
    (:attr:`Answer.cancelled`): the controller frees its sequence on that event. An answer that
    finished first ends as usual.

    Raises:
        HomeringError: the cluster failed, or a cancelled answer did not end within :data:`CANCEL_WAIT_S` s.
    """
    loop = asyncio.get_running_loop()
    answer = Answer()
    stream = client.generate(request)
    stopping = asyncio.ensure_future(stop.wait()) if stop is not None else None
    canceller: asyncio.Task[None] | None = None
    deadline: float | None = None
    step: asyncio.Future[StreamEvent] | None = None  # the stream's next event, being awaited
    try:
        while True:
            if step is None:
                step = asyncio.ensure_future(stream.__anext__())
            waiting: set[asyncio.Future[Any]] = {step}
            if stopping is not None and canceller is None:
                waiting.add(stopping)
            left = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if step in done:
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return answer
                step = None
                answer.add(event)
                _deliver(event, on_event, on_text if canceller is None else None)
            elif canceller is None:  # stop
                canceller = asyncio.create_task(_keep_cancelling(client, request.request_id))
                deadline = loop.time() + CANCEL_WAIT_S
            else:
                raise HomeringError(f"the cluster did not stop the answer within {CANCEL_WAIT_S:.0f} s")
    finally:
        for task in (stopping, canceller):
            if task is not None:
                task.cancel()
        if canceller is not None and answer.finish_reason is None:  # given up on: one more word to the head
            _last_cancels.spawn(client.cancel(request.request_id))
        if step is not None and not step.done():
            step.cancel()  # unwinds the stream (it unsubscribes)
            await asyncio.wait({step})
        await stream.aclose()


_last_cancels = Tasks("the chat")  # cancels on their way after ask() gave up (kept from the GC)


async def _keep_cancelling(client: ClusterClient, request_id: str) -> None:
    while True:
        await client.cancel(request_id)
        await asyncio.sleep(CANCEL_RESEND_S)


async def one_shot(
    broker: mqtt.BrokerURL,
    text: str,
    *,
    raw: bool,
    sampling: Sampling,
    as_json: bool,
    ready_timeout: float = 180.0,
    key: ClusterKey | None = None,
) -> int:
    """``homering up --prompt``: print the completion (or one JSON object) to stdout (``key``: the cluster key).

    Progress while the cluster starts goes to stderr (:func:`wait_ready_shown`); stdout holds only the answer.
    """
    async with ClusterClient(broker, key=key) as client:
        await wait_ready_shown(client, Console(stderr=True), ready_timeout)
        request = GenerateRequest(
            request_id=new_request_id(),
            sampling=sampling,
            prompt=text if raw else None,
            messages=None if raw else [ChatMessage(role="user", content=text)],
        )

        def echo(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        answer = await ask(client, request, None if as_json else echo)
        if as_json:
            print(
                json.dumps(
                    {
                        "text": answer.text,
                        "prompt_token_ids": answer.prompt_token_ids,
                        "token_ids": answer.token_ids,
                        "ttft_ms": answer.ttft_ms,
                        "ms_per_token": answer.ms_per_token,
                        "finish_reason": answer.finish_reason,
                        "predicted_ms_per_token": client.plan.predicted_ms_per_token if client.plan else None,
                        "plan": client.plan.model_dump() if client.plan else None,
                    }
                )
            )
        else:
            print()
    return 0


async def chat(
    broker: mqtt.BrokerURL,
    *,
    sampling: Sampling,
    system: str | None = None,
    console: Console | None = None,
    ready_timeout: float = 180.0,
    key: ClusterKey | None = None,
) -> int:
    """The interactive chat loop (``key``: the cluster key). Returns the exit code.

    Lines come from the line editor on a terminal (:class:`~homering.client.terminal.LineEditor`), else one by
    one from standard input (:func:`~homering.client.terminal.read_line`). Ctrl-C during an answer cancels it
    on the cluster and returns to the prompt; at an empty prompt Ctrl-C, like Ctrl-D and /quit, ends the chat
    with 0.
    """
    console = console or Console()
    async with ClusterClient(broker, key=key) as client:
        status = await wait_ready_shown(client, Console(stderr=True), ready_timeout)
        plan = client.plan
        if plan is None:  # wait_ready returns once the ready plan is known
            raise HomeringError("the cluster is ready but its plan is unknown")
        console.print(
            f"[bold]homering[/] · model [cyan]{status.model}[/] · {len(plan.ring)} agent(s) · ctx {status.n_ctx}"
        )
        console.print(plan_table(plan))
        console.print(f"[dim]{HELP}[/]")
        conversation = _Conversation(client, console, sampling, system)
        with sigint_calls(conversation.ctrl_c):
            return await conversation.run()


class _Conversation:
    """One chat: the history, the commands, and each exchange (an answer, cancelled on Ctrl-C)."""

    def __init__(self, client: ClusterClient, console: Console, sampling: Sampling, system: str | None) -> None:
        self.client, self.console, self.sampling, self.system = client, console, sampling, system
        self.editor = LineEditor() if terminal_input() else None
        self.ctrl_c = CtrlC()
        self.history: list[ChatMessage] = [ChatMessage(role="system", content=system)] if system else []
        self.shown = client.plan.plan_id if client.plan else None

    async def run(self) -> int:
        """Read lines and answer them until the input ends, /quit, or Ctrl-C at the prompt: 0."""
        while True:
            plan = self.client.plan
            if plan is not None and plan.plan_id != self.shown:  # agents joined or left
                self.shown = plan.plan_id
                self.console.print(f"[yellow]the cluster re-planned[/] ({len(plan.ring)} agent(s)); /plan shows it")
            read = await self.ctrl_c.run(
                self.editor.read() if self.editor else read_line(self.console, "[bold green]you>[/] ")
            )
            if read.cancelled() or isinstance(read.exception(), EOFError):
                self.console.print()
                return 0
            line = read.result()
            cmd = line.strip()
            if not cmd:
                continue
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd.startswith("/"):
                self.command(cmd)
            else:
                await self.exchange(line)

    def command(self, cmd: str) -> None:
        """Run a command other than /quit: /plan, /cluster, /reset (or say it is unknown)."""
        console = self.console
        if cmd == "/plan":
            if self.client.plan is not None:
                console.print(plan_table(self.client.plan))
        elif cmd == "/cluster":
            console.print(cluster_table(self.client))
        elif cmd == "/reset":
            exchanges = sum(m.role == "user" for m in self.history)
            self.history = self.history[:1] if self.system else []
            console.print(
                f"[dim]forgot the conversation ({exchanges} exchange(s)"
                f"{'; the system message stays' if self.system else ''}): the next message starts anew[/]"
                if exchanges
                else "[dim]nothing to forget: the conversation is empty[/]"
            )
        else:
            console.print(f"[yellow]unknown command {cmd}[/] ({HELP})")

    async def exchange(self, line: str) -> None:
        """Send ``line`` with the history and show the answer as it arrives; keep it unless it failed or was
        cancelled."""
        console, history = self.console, self.history
        history.append(ChatMessage(role="user", content=line))
        request = GenerateRequest(request_id=new_request_id(), messages=history, sampling=self.sampling)
        console.print("[bold blue]ai>[/] ", end="")
        t0 = time.perf_counter()
        texts: list[str] = []

        def show(delta: str) -> None:
            texts.append(delta)
            console.print(delta, end="", markup=False, highlight=False)

        stop = asyncio.Event()
        job = await self.ctrl_c.run(ask(self.client, request, show, stop=stop), stop)
        if job.cancelled():  # a second Ctrl-C: no more waiting for the cluster
            console.print(
                "\n[yellow]stopped waiting[/] for the cluster to cancel the answer (not kept in the conversation)",
                highlight=False,
            )
            history.pop()
            return
        exc = job.exception()
        if isinstance(exc, HomeringError):
            note = str(exc)
            if "context holds" in note and len(history) > (2 if self.system else 1):
                note += " (the conversation so far counts too: /reset forgets it)"
            console.print(Text.assemble("\n" if texts else "", ("error: ", "red"), note), soft_wrap=True)
            history.pop()
            return
        answer: Answer = job.result()  # any other exception is raised here
        if answer.cancelled:
            console.print(
                f"\n[yellow]cancelled[/] after {len(answer.token_ids)} token(s) (not kept in the conversation)",
                highlight=False,
            )
            history.pop()
            return
        self._report(answer, time.perf_counter() - t0)
        history.append(ChatMessage(role="assistant", content=answer.text))

    def _report(self, answer: Answer, wall: float) -> None:
        n = len(answer.token_ids)
        tps = 1000.0 / answer.ms_per_token if answer.ms_per_token else 0.0
        predicted = self.client.plan.predicted_ms_per_token if self.client.plan else None
        vs = f" (predicted {1000.0 / predicted:.1f})" if predicted else ""
        self.console.print(
            f"\n[dim]{n} tokens · {tps:.1f} tokens/s{vs} · TTFT {answer.ttft_ms or 0:.0f} ms · {wall:.1f} s[/]"
        )

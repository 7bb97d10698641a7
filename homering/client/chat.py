"""``homering chat``: a rich terminal chat, and the one-shot prompt of ``homering up --prompt``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table
from rich.text import Text

from homering.transport import mqtt
from homering.client.client import ClusterClient, new_request_id
from homering.wire import ChatMessage, GenerateRequest, Plan, Sampling, StreamEvent
from homering.wire.security import ClusterKey
from homering.errors import HomeringError

HELP = ("commands: /plan shows the layer assignment, /cluster the agents at work, /reset forgets the "
        "conversation, /quit (or Ctrl-D) exits; Ctrl-C stops an answer, and exits at an empty prompt")

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

    def add(self, event: StreamEvent) -> None:
        if event.type == "error":
            raise HomeringError(event.error or "the cluster failed")
        self.text += event.text
        if event.type == "done":
            self.token_ids = event.token_ids or []
            self.prompt_token_ids = event.prompt_token_ids or []
            self.finish_reason = event.finish_reason
            self.ttft_ms = event.ttft_ms
            self.ms_per_token = event.ms_per_token

    @property
    def cancelled(self) -> bool:
        """The head stopped the answer because it was asked to (:meth:`ClusterClient.cancel`)."""
        return self.finish_reason == "cancelled"


def plan_table(plan: Plan) -> Table:
    """The ring as a table: agent, address, layer windows, mode, predicted ms per token and role."""
    predicted = (f", predicted {plan.predicted_ms_per_token:.1f} ms/token"
                 if plan.predicted_ms_per_token is not None else "")
    table = Table(title=f"plan {plan.plan_id} ({plan.planner}, k={plan.k}, {plan.n_layers} layers, "
                        f"ctx {plan.n_ctx}{predicted})",
                  caption=f"dropped: {', '.join(plan.dropped)}" if plan.dropped else None)
    for col in ("#", "agent", "data port", "layers", "gpu", "mode", "compute ms", "disk ms", "hop ms", "role"):
        table.add_column(col, justify="right" if col.endswith("ms") or col == "gpu" else "left")
    for i, a in enumerate(plan.ring):
        role = "head" if i == len(plan.ring) - 1 else ("embeds" if i == 0 else "")
        layers = ", ".join(f"[{w.start},{w.end})" for w in a.windows)
        gpu = str(sum(w.gpu_layers for w in a.windows))
        p = a.predicted
        costs = [f"{p.compute_ms:.2f}", f"{p.disk_ms:.2f}", f"{p.hop_ms:.2f}"] if p else ["", "", ""]
        table.add_row(str(i), a.name, f"{a.host}:{a.data_port}", layers, gpu, a.mode or "", *costs, role)
    return table


def cluster_table(client: ClusterClient) -> Table:
    """The agents at work: status, layer windows, measured ms per window, link latency, memory and tokens/s.

    From the agents' retained :class:`~homering.wire.AgentStats` (every few seconds)
    and the plan (link latency to the head, measured when it was made).
    """
    plan = client.plan
    ring = {a.name: a for a in plan.ring} if plan else {}
    table = Table(title=f"cluster · plan {plan.plan_id if plan else '-'}")
    for col in ("agent", "status", "role", "windows", "ms/window", "link ms", "RSS MiB", "tokens/s"):
        table.add_column(col, justify="left" if col in ("agent", "status", "role", "windows") else "right")
    names = sorted(set(client.agent_status) | set(client.agent_stats),
                   key=lambda n: (n not in ring, list(ring).index(n) if n in ring else 0, n))
    for name in names:
        status = client.agent_status.get(name)
        st = client.agent_stats.get(name)
        pa = ring.get(name)
        current = st is not None and plan is not None and st.plan_id == plan.plan_id
        windows = ", ".join(f"[{w.start},{w.end})" for w in pa.windows) if pa else "-"
        per_window = ", ".join(f"{w.ms_per_forward:.1f}" if w.ms_per_forward is not None else "-"
                               for w in st.windows) if current and st.windows else "-"
        role = "head" if plan and plan.head.name == name else ("ring" if pa else "idle")
        link = f"{pa.link_ms:.2f}" if pa and pa.link_ms is not None and role != "head" else "-"
        table.add_row(name, status.state if status else "?", role, windows, per_window, link,
                      f"{st.rss_bytes / 2**20:.0f}" if st else "-", f"{st.tokens_per_s:.1f}" if current else "-")
    return table


async def wait_ready_shown(client: ClusterClient, console: Console, timeout: float):
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


async def headless(cluster, api_url: str, ready_timeout: float = 300.0) -> int:
    """``homering up --no-chat``: wait until the cluster is ready, say where the API is, serve until Ctrl-C."""
    console = Console(stderr=True)
    async with ClusterClient(cluster.broker, key=cluster.key) as client:
        status = await wait_ready_shown(client, console, ready_timeout)
        console.print(f"[bold]homering[/] · model [cyan]{status.model}[/] · {len(client.plan.ring)} agent(s) · "
                      f"OpenAI API at [bold]{api_url}[/] · Ctrl-C stops")
        while True:
            cluster.check()
            await asyncio.sleep(1.0)


async def ask(client: ClusterClient, request: GenerateRequest, on_text=None, *,
              stop: asyncio.Event | None = None) -> Answer:
    """Send one request and gather the answer, calling ``on_text(delta)`` as tokens arrive.

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
    canceller: asyncio.Task | None = None
    deadline = None
    step = None  # the stream's next event, being awaited
    try:
        while True:
            if step is None:
                step = asyncio.ensure_future(stream.__anext__())
            waiting = {step} if stopping is None or canceller is not None else {step, stopping}
            left = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if step in done:
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return answer
                step = None
                answer.add(event)
                if on_text is not None and event.text and canceller is None:
                    on_text(event.text)
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
            last = asyncio.ensure_future(client.cancel(request.request_id))
            _last_cancels.add(last)
            last.add_done_callback(_last_cancels.discard)
        if step is not None and not step.done():
            step.cancel()  # unwinds the stream (it unsubscribes)
            await asyncio.wait({step})
        await stream.aclose()


_last_cancels: set[asyncio.Future] = set()  # cancels on their way after ask() gave up (kept from the GC)


async def _keep_cancelling(client: ClusterClient, request_id: str) -> None:
    while True:
        await client.cancel(request_id)
        await asyncio.sleep(CANCEL_RESEND_S)


async def one_shot(broker: mqtt.BrokerURL, text: str, *, raw: bool, sampling: Sampling, as_json: bool,
                   ready_timeout: float = 180.0, key: ClusterKey | None = None) -> int:
    """``homering up --prompt``: print the completion (or one JSON object) to stdout (``key``: the cluster key).

    Progress while the cluster starts goes to stderr (:func:`wait_ready_shown`); stdout holds only the answer.
    """
    async with ClusterClient(broker, key=key) as client:
        await wait_ready_shown(client, Console(stderr=True), ready_timeout)
        request = GenerateRequest(request_id=new_request_id(), sampling=sampling,
                                  prompt=text if raw else None,
                                  messages=None if raw else [ChatMessage(role="user", content=text)])

        def echo(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        answer = await ask(client, request, None if as_json else echo)
        if as_json:
            print(json.dumps({
                "text": answer.text, "prompt_token_ids": answer.prompt_token_ids,
                "token_ids": answer.token_ids, "ttft_ms": answer.ttft_ms,
                "ms_per_token": answer.ms_per_token, "finish_reason": answer.finish_reason,
                "predicted_ms_per_token": client.plan.predicted_ms_per_token if client.plan else None,
                "plan": client.plan.model_dump() if client.plan else None,
            }))
        else:
            print()
    return 0


class _StdinLines:
    """Lines of standard input read with ``os.read`` on file descriptor 0 (no Python buffer, no lock)."""

    def __init__(self) -> None:
        self._pending = b""
        self._eof = False

    def readline(self) -> str:
        """The next line without its newline; EOFError at the end of the input."""
        while b"\n" not in self._pending and not self._eof:
            chunk = os.read(0, 4096)
            self._eof = not chunk
            self._pending += chunk
        if not self._pending:
            raise EOFError
        line, sep, self._pending = self._pending.partition(b"\n")
        return line.decode(sys.stdin.encoding if sys.stdin else "utf-8", errors="replace").rstrip("\r")


_stdin = _StdinLines()


async def read_line(console: Console, prompt: str) -> str:
    """Print ``prompt``, then read a line of standard input without blocking the event loop or the exit.

    The line is read on a daemon thread of its own with ``os.read``, not with
    ``input()`` on the loop's default executor: ``asyncio.run`` joins that
    executor's threads on the way out, so after Ctrl-C or SIGTERM (which cancel
    the chat while it waits here) the process hung until the user pressed
    Enter; and a daemon thread blocked in ``sys.stdin``'s buffered reader holds
    its lock, which makes the interpreter's shutdown abort ("could not acquire
    lock for <_io.BufferedReader name='<stdin>'>"). A terminal's own line
    editing (canonical mode) works as with ``input()`` (homering loads no readline).

    Raises:
        EOFError: the input ended (Ctrl-D).
    """
    console.print(prompt, end="")
    loop = asyncio.get_running_loop()
    answer: asyncio.Future[str] = loop.create_future()

    def settle(result: str | None, exc: BaseException | None) -> None:
        if not answer.done():
            answer.set_exception(exc) if exc is not None else answer.set_result(result)

    def work() -> None:
        try:
            result, exc = _stdin.readline(), None
        except (OSError, EOFError) as e:
            result, exc = None, EOFError() if isinstance(e, OSError) else e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=work, name="chat-input", daemon=True).start()
    return await answer


def terminal_input() -> bool:
    """Standard input is a terminal, and so is standard output or error (where the line editor draws)."""
    return (sys.stdin is not None and sys.stdin.isatty()
            and any(s is not None and s.isatty() for s in (sys.stdout, sys.stderr)))


class LineEditor:
    """Lines typed at a terminal, read with prompt_toolkit: line editing, a history (up and down keys), no
    length limit.

    A terminal in canonical mode (``input()``, :func:`read_line`) cuts a line at 4095 bytes without a word
    (the kernel's line buffer), so a long paste reached the model cut short; prompt_toolkit reads keys in
    raw mode, and a (bracketed) paste arrives whole, its newlines included. Esc Enter adds a new line.
    Ctrl-C clears a line that has text; on an empty line it ends the input, as Ctrl-D does (EOFError: a
    KeyboardInterrupt would escape the chat's task and the event loop). SIGINT from elsewhere is left to
    the chat (``handle_sigint=False``).
    """

    def __init__(self, prompt: str = "you>") -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.formatted_text import FormattedText
        from prompt_toolkit.history import InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.output import create_output

        keys = KeyBindings()

        @keys.add("c-c")
        def _interrupt(event) -> None:
            buffer = event.app.current_buffer
            if buffer.text:
                buffer.reset()
            else:
                event.app.exit(exception=EOFError, style="class:aborting")

        @keys.add("escape", "enter")
        def _newline(event) -> None:
            event.app.current_buffer.insert_text("\n")

        self._session = PromptSession(history=InMemoryHistory(), key_bindings=keys,
                                      output=create_output(always_prefer_tty=True))
        self._message = FormattedText([("ansigreen bold", prompt), ("", " ")])

    async def read(self) -> str:
        """The next line. Raises: EOFError (Ctrl-D, or Ctrl-C on an empty line)."""
        return await self._session.prompt_async(self._message, handle_sigint=False)


@contextlib.contextmanager
def sigint_calls(callback):
    """While the block runs, SIGINT (Ctrl-C) calls ``callback()`` on the running loop instead of
    interrupting the program; yields False (and changes nothing) where the loop cannot handle signals
    (not the main thread)."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, callback)
    except (ValueError, RuntimeError, NotImplementedError):
        yield False
        return
    try:
        yield True
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)  # e.g. asyncio.run's, which cancels the main task


class _CtrlC:
    """What SIGINT does in :func:`chat`: during an answer the first stops it (``stop``: it is cancelled on the
    cluster) and the next gives up waiting for that; otherwise it cancels ``task`` (a prompt not read by
    the line editor, which gets Ctrl-C as a key), which ends the chat."""

    def __init__(self) -> None:
        self.task: asyncio.Future | None = None
        self.stop: asyncio.Event | None = None

    def __call__(self) -> None:
        if self.stop is not None and not self.stop.is_set():
            self.stop.set()
        elif self.task is not None:
            self.task.cancel()

    async def run(self, awaitable, stop: asyncio.Event | None = None) -> asyncio.Future:
        """Run ``awaitable`` to its end (Ctrl-C as above) and return it as a finished future."""
        task = asyncio.ensure_future(awaitable)
        self.task, self.stop = task, stop
        try:
            await asyncio.wait({task})
        finally:
            self.task = self.stop = None
            if not task.done():  # the chat itself was cancelled
                task.cancel()
        return task


async def chat(broker: mqtt.BrokerURL, *, sampling: Sampling, system: str | None = None,
               console: Console | None = None, ready_timeout: float = 180.0, key: ClusterKey | None = None) -> int:
    """The interactive chat loop (``key``: the cluster key). Returns the exit code.

    Lines come from the line editor on a terminal (:class:`LineEditor`), else one by one from
    standard input (:func:`read_line`). Ctrl-C during an answer cancels it on the cluster and
    returns to the prompt; at an empty prompt Ctrl-C, like Ctrl-D and /quit, ends the chat with 0.
    """
    console = console or Console()
    async with ClusterClient(broker, key=key) as client:
        status = await wait_ready_shown(client, Console(stderr=True), ready_timeout)
        console.print(f"[bold]homering[/] · model [cyan]{status.model}[/] · "
                      f"{len(client.plan.ring)} agent(s) · ctx {status.n_ctx}")
        console.print(plan_table(client.plan))
        console.print(f"[dim]{HELP}[/]")
        editor = LineEditor() if terminal_input() else None
        ctrl_c = _CtrlC()
        with sigint_calls(ctrl_c):
            return await _converse(client, console, editor, ctrl_c, sampling, system)


async def _converse(client: ClusterClient, console: Console, editor: LineEditor | None, ctrl_c: _CtrlC,
                    sampling: Sampling, system: str | None) -> int:
    shown = client.plan.plan_id
    history: list[ChatMessage] = [ChatMessage(role="system", content=system)] if system else []
    while True:
        if client.plan is not None and client.plan.plan_id != shown:  # agents joined or left
            shown = client.plan.plan_id
            console.print(f"[yellow]the cluster re-planned[/] ({len(client.plan.ring)} agent(s)); /plan shows it")
        read = await ctrl_c.run(editor.read() if editor else read_line(console, "[bold green]you>[/] "))
        if read.cancelled() or isinstance(read.exception(), EOFError):
            console.print()
            return 0
        line = read.result()
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/plan":
            console.print(plan_table(client.plan))
            continue
        if cmd == "/cluster":
            console.print(cluster_table(client))
            continue
        if cmd == "/reset":
            exchanges = sum(m.role == "user" for m in history)
            history = history[:1] if system else []
            console.print(f"[dim]forgot the conversation ({exchanges} exchange(s)"
                          f"{'; the system message stays' if system else ''}): the next message starts anew[/]"
                          if exchanges else "[dim]nothing to forget: the conversation is empty[/]")
            continue
        if cmd.startswith("/"):
            console.print(f"[yellow]unknown command {cmd}[/] ({HELP})")
            continue
        history.append(ChatMessage(role="user", content=line))
        request = GenerateRequest(request_id=new_request_id(), messages=history, sampling=sampling)
        console.print("[bold blue]ai>[/] ", end="")
        t0 = time.perf_counter()
        texts: list[str] = []

        def show(delta: str) -> None:
            texts.append(delta)
            console.print(delta, end="", markup=False, highlight=False)

        stop = asyncio.Event()
        job = await ctrl_c.run(ask(client, request, show, stop=stop), stop)
        if job.cancelled():  # a second Ctrl-C: no more waiting for the cluster
            console.print("\n[yellow]stopped waiting[/] for the cluster to cancel the answer "
                          "(not kept in the conversation)", highlight=False)
            history.pop()
            continue
        exc = job.exception()
        if isinstance(exc, HomeringError):
            note = str(exc)
            if "context holds" in note and len(history) > (2 if system else 1):
                note += " (the conversation so far counts too: /reset forgets it)"
            console.print(Text.assemble("\n" if texts else "", ("error: ", "red"), note), soft_wrap=True)
            history.pop()
            continue
        answer = job.result()  # any other exception is raised here
        if answer.cancelled:
            console.print(f"\n[yellow]cancelled[/] after {len(answer.token_ids)} token(s) "
                          f"(not kept in the conversation)", highlight=False)
            history.pop()
            continue
        wall = time.perf_counter() - t0
        n = len(answer.token_ids)
        tps = 1000.0 / answer.ms_per_token if answer.ms_per_token else 0.0
        predicted = client.plan.predicted_ms_per_token if client.plan else None
        vs = f" (predicted {1000.0 / predicted:.1f})" if predicted else ""
        console.print(f"\n[dim]{n} tokens · {tps:.1f} tokens/s{vs} · TTFT {answer.ttft_ms or 0:.0f} ms · "
                      f"{wall:.1f} s[/]")
        history.append(ChatMessage(role="assistant", content=answer.text))

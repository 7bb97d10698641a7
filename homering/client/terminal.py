"""The terminal under ``homering chat``: lines typed (a line editor, or standard input read without blocking the
exit), Ctrl-C handled by the chat instead of ending the program, and the plan and the cluster as tables."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from homering.client.client import ClusterClient
from homering.wire import Plan

HELP = (
    "commands: /plan shows the layer assignment, /cluster the agents at work, /reset forgets the "
    "conversation, /quit (or Ctrl-D) exits; Ctrl-C stops an answer, and exits at an empty prompt"
)
"""What the chat's commands and keys do (printed when the chat starts)."""


def plan_table(plan: Plan) -> Table:
    """The ring as a table: agent, address, layer windows, mode, predicted ms per token and role."""
    predicted = (
        f", predicted {plan.predicted_ms_per_token:.1f} ms/token" if plan.predicted_ms_per_token is not None else ""
    )
    table = Table(
        title=f"plan {plan.plan_id} ({plan.planner}, k={plan.k}, {plan.n_layers} layers, ctx {plan.n_ctx}{predicted})",
        caption=f"dropped: {', '.join(plan.dropped)}" if plan.dropped else None,
    )
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
    names = sorted(
        set(client.agent_status) | set(client.agent_stats),
        key=lambda n: (n not in ring, list(ring).index(n) if n in ring else 0, n),
    )
    for name in names:
        status = client.agent_status.get(name)
        st = client.agent_stats.get(name)
        pa = ring.get(name)
        current = st if st is not None and plan is not None and st.plan_id == plan.plan_id else None
        windows = ", ".join(f"[{w.start},{w.end})" for w in pa.windows) if pa else "-"
        per_window = (
            ", ".join(f"{w.ms_per_forward:.1f}" if w.ms_per_forward is not None else "-" for w in current.windows)
            if current and current.windows
            else "-"
        )
        role = "head" if plan and plan.head.name == name else ("ring" if pa else "idle")
        link = f"{pa.link_ms:.2f}" if pa and pa.link_ms is not None and role != "head" else "-"
        table.add_row(
            name,
            status.state if status else "?",
            role,
            windows,
            per_window,
            link,
            f"{st.rss_bytes / 2**20:.0f}" if st else "-",
            f"{current.tokens_per_s:.1f}" if current else "-",
        )
    return table


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

    def settle(result: str, exc: BaseException | None) -> None:
        if not answer.done():
            answer.set_exception(exc) if exc is not None else answer.set_result(result)

    def work() -> None:
        result, exc = "", None
        try:
            result = _stdin.readline()
        except (OSError, EOFError) as e:
            exc = EOFError() if isinstance(e, OSError) else e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=work, name="chat-input", daemon=True).start()
    return await answer


def terminal_input() -> bool:
    """Standard input is a terminal, and so is standard output or error (where the line editor draws)."""
    return (
        sys.stdin is not None
        and sys.stdin.isatty()
        and any(s is not None and s.isatty() for s in (sys.stdout, sys.stderr))
    )


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

        self._session: PromptSession[str] = PromptSession(
            history=InMemoryHistory(), key_bindings=keys, output=create_output(always_prefer_tty=True)
        )
        self._message = FormattedText([("ansigreen bold", prompt), ("", " ")])

    async def read(self) -> str:
        """The next line. Raises: EOFError (Ctrl-D, or Ctrl-C on an empty line)."""
        return await self._session.prompt_async(self._message, handle_sigint=False)


@contextlib.contextmanager
def sigint_calls(callback: Callable[[], object]) -> Iterator[bool]:
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


class CtrlC:
    """What SIGINT does in :func:`homering.client.chat.chat`: during an answer the first stops it (``stop``: it
    is cancelled on the cluster) and the next gives up waiting for that; otherwise it cancels ``task`` (a prompt
    not read by the line editor, which gets Ctrl-C as a key), which ends the chat."""

    def __init__(self) -> None:
        self.task: asyncio.Future[Any] | None = None
        self.stop: asyncio.Event | None = None

    def __call__(self) -> None:
        if self.stop is not None and not self.stop.is_set():
            self.stop.set()
        elif self.task is not None:
            self.task.cancel()

    async def run(self, awaitable: Awaitable[Any], stop: asyncio.Event | None = None) -> asyncio.Future[Any]:
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

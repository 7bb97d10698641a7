"""``homering chat``: a rich terminal chat, and the one-shot prompt of ``homering up --prompt``."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from homering.cluster import mqtt
from homering.cluster.client import ClusterClient, new_request_id
from homering.cluster.schema import ChatMessage, GenerateRequest, Plan, Sampling, StreamEvent
from homering.cluster.security import ClusterKey
from homering.errors import HomeringError

HELP = ("commands: /plan shows the layer assignment, /cluster the agents at work, /reset forgets the "
        "conversation, /quit (or Ctrl-D) exits")


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

    From the agents' retained :class:`~homering.cluster.schema.AgentStats` (every few seconds)
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


async def ask(client: ClusterClient, request: GenerateRequest, on_text=None) -> Answer:
    """Send one request and gather the answer, calling ``on_text(delta)`` as tokens arrive."""
    answer = Answer()
    async for event in client.generate(request):
        answer.add(event)
        if on_text and event.text:
            on_text(event.text)
    return answer


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


async def chat(broker: mqtt.BrokerURL, *, sampling: Sampling, system: str | None = None,
               console: Console | None = None, ready_timeout: float = 180.0, key: ClusterKey | None = None) -> int:
    """The interactive chat loop (``key``: the cluster key). Returns the exit code."""
    console = console or Console()
    async with ClusterClient(broker, key=key) as client:
        status = await wait_ready_shown(client, Console(stderr=True), ready_timeout)
        console.print(f"[bold]homering[/] · model [cyan]{status.model}[/] · "
                      f"{len(client.plan.ring)} agent(s) · ctx {status.n_ctx}")
        console.print(plan_table(client.plan))
        console.print(f"[dim]{HELP}[/]")
        shown = client.plan.plan_id
        history: list[ChatMessage] = [ChatMessage(role="system", content=system)] if system else []
        while True:
            if client.plan is not None and client.plan.plan_id != shown:  # agents joined or left
                shown = client.plan.plan_id
                console.print(f"[yellow]the cluster re-planned[/] ({len(client.plan.ring)} agent(s)); /plan shows it")
            try:
                line = await asyncio.to_thread(console.input, "[bold green]you>[/] ")
            except (EOFError, KeyboardInterrupt):
                console.print()
                return 0
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
                history = history[:1] if system else []
                continue
            if cmd.startswith("/"):
                console.print(f"[yellow]unknown command {cmd}[/] ({HELP})")
                continue
            history.append(ChatMessage(role="user", content=line))
            request = GenerateRequest(request_id=new_request_id(), messages=history, sampling=sampling)
            console.print("[bold blue]ai>[/] ", end="")
            t0 = time.perf_counter()
            try:
                answer = await ask(client, request, lambda d: console.print(d, end="", markup=False,
                                                                            highlight=False))
            except HomeringError as exc:
                console.print(f"\n[red]error:[/] {exc}")
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

"""``homering bench speculative``: speculative decoding on an emulated home cluster (Wi-Fi on every link).

In one invocation, on one testbed (:mod:`homering.testbed`), three runs, each one cluster whose controller
has a ``--draft`` and whose plan spreads the layers over every device (``--planner proportional``: these
small models would fit on one device, where Halda keeps them, and the ring's hops are what speculative
decoding saves); every prompt is answered twice on it, one right after the other, plain (the request's
``speculative.draft`` off) and speculative, so each ratio compares the same prompts on the same plan (after
a warm-up answer each way: the γ chooser, one per plan and drafter on the head, learns from its first trips
what a cluster serving for hours learns once):

- ``ngram``: SmolLM2 with ``--draft ngram`` on edit, summary and JSON prompts, each answered to its end;
- ``draft``: SmolLM2 dequantized to F16 (the target) with the Q4_1 original as its draft;
- ``draft_no_agreement``: a random-weight llama3.2-1b (SmolLM2's tokenizer) with SmolLM2 as its draft: the
  drafts are never kept, which shows what adaptive γ loses.

Reported per run: ``tokens_per_s`` and ``plain_tokens_per_s`` (decode, from the head's mean step after the
first token), ``acceptance_rate`` (kept / drafted), ``mean_gamma`` (drafted / trips). Greedy; the model
pairs write ``tokens`` tokens per prompt (end-of-generation ignored; 128 by default, a short chat answer), the
n-gram answers end where the model ends them (at most :data:`NGRAM_TOKENS`). An answer's first trip (its draft
reads the prompt first) and its last ones (``max_tokens`` leaves no room for drafts) gain the least, so short
answers dilute the steady state: the F16/Q4_1 pair ran 1.82-2.13× plain decoding at 128 tokens per answer
(2.00× on average over 12 invocations), 1.48-2.00× (1.78× over 4) at 48, on the same day and machine
(2026-12-08).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from homering.bench.cluster import ClusterBench
from homering.bench.cluster_report import describe_testbed, write_results
from homering.bench.cluster_runs import RunConfig
from homering.client.chat import Answer, ask
from homering.client.client import ClusterClient, new_request_id
from homering.errors import HomeringError
from homering.transport import mqtt
from homering.wire import ChatMessage, GenerateRequest, Sampling, Speculative
from homering.wire.security import load_key

NGRAM_PROMPTS = [
    'Return this JSON with "city" changed to "Rome": {"name": "Alice", "age": 30, "city": "Paris", '
    '"email": "alice@example.com", "tags": ["admin", "editor"], "active": true}',
    'Return this JSON with "age" set to 31: {"id": 7, "name": "Bob Smith", "age": 30, "address": {"street": '
    '"12 Oak Road", "city": "Leeds", "zip": "LS1 4AB"}, "phone": "555-0100"}',
    "Convert this to JSON: name Alice, age 30, city Paris, job engineer, hobby chess.",
    'Fix the typo and repeat the code: for i in range(10):\n    if i % 2 == 0:\n        print(i, "is evn")\n'
    '    else:\n        print(i, "is odd")',
    "Repeat this list in lowercase: Apples, Bananas, Cherries, Dates, Elderberries, Figs, Grapes, Honeydew melons.",
    "Correct the grammar of this sentence: She go to the market every morning and buy fresh bread, milk and eggs "
    "for her family.",
    "Summarize in one sentence: The printing press was invented by Johannes Gutenberg around 1440. "
    "The printing press made books cheaper and spread literacy across Europe.",
]
"""Edits, JSON and a summary: answers that copy much of their prompt, where prompt lookup pays. Answered to
their end of generation (SmolLM2's answers take 18-62 tokens); past it, the model invents further chat turns
that no lookup predicts, which is not what a user of these prompts reads."""
NGRAM_TOKENS = 80
"""At most this many tokens per n-gram answer (they end before it)."""
GENERAL_PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how photosynthesis works.",
    "What are the benefits of regular exercise?",
    "Describe the water cycle.",
]


class SpeculativeBench(ClusterBench):
    """A :class:`~homering.bench.cluster.ClusterBench` whose controller has ``--draft``, and whose measurement
    answers each prompt plain and speculative."""

    def __init__(
        self, testbed, model_path: Path, *, draft: str, prompts: list[str], tokens: int, ignore_eos: bool, **kwargs
    ):
        super().__init__(testbed, model_path, tokens=tokens, prompt_tokens=8, n_ctx=512, **kwargs)
        self.draft, self.prompts, self.ignore_eos = draft, prompts, ignore_eos

    def _controller_argv(self, cfg: RunConfig, url: str, n_agents: int) -> list[str]:
        return [*super()._controller_argv(cfg, url, n_agents), "--draft", self.draft]

    async def _measure(self, cfg: RunConfig, agents: dict[str, int]) -> dict:
        async with ClusterClient(mqtt.BrokerURL.parse(self.tb.broker_url), key=load_key()) as client:
            await client.wait_ready(self.timeout)
            if client.plan is None:
                raise HomeringError("the cluster is ready but has no plan")
            await self._ask(client, self.prompts[0], plain=True, tokens=4)  # warm-up, both ways: the plan's
            await self._ask(client, self.prompts[0], plain=False, tokens=16)  # first draft trips learn γ
            plain: list[Answer] = []
            spec: list[Answer] = []
            for p in self.prompts:  # interleaved: a drift of the machine's speed falls on both alike
                plain.append(await self._ask(client, p, plain=True))
                spec.append(await self._ask(client, p, plain=False))
        drafted = sum(a.drafted or 0 for a in spec)
        return {
            "tokens_per_s": _rate(spec),
            "plain_tokens_per_s": _rate(plain),
            "acceptance_rate": (sum(a.accepted or 0 for a in spec) / drafted) if drafted else 0.0,
            "mean_gamma": drafted / max(1, sum(a.trips or 0 for a in spec)),
            "drafted": drafted,
            "same_tokens": [a.token_ids for a in plain] == [a.token_ids for a in spec],
            "prompts": len(self.prompts),
            "k": client.plan.k,
            "ring": [a.name for a in client.plan.ring],
        }

    async def _ask(self, client: ClusterClient, text: str, *, plain: bool, tokens: int | None = None) -> Answer:
        req = GenerateRequest(
            request_id=new_request_id(),
            messages=[ChatMessage(role="user", content=text)],
            sampling=Sampling(max_tokens=tokens or self.tokens, temperature=0, ignore_eos=self.ignore_eos),
            speculative=Speculative(draft="off") if plain else None,
        )
        return await ask(client, req)


def _rate(answers: list[Answer]) -> float:
    """Decode tokens per second over ``answers`` (the head's steps after each first token)."""
    steps = sum(max(0, len(a.token_ids) - 1) for a in answers)
    ms = sum((a.ms_per_token or 0.0) * max(0, len(a.token_ids) - 1) for a in answers)
    return steps * 1000 / ms if ms else 0.0


def run_speculative_bench(
    spec_path: Path,
    *,
    tokens: int = 128,
    out_dir: Path = Path("bench/results"),
    console: Console | None = None,
    only: list[str] | None = None,
    log_args: tuple[str, ...] = ("-q",),
) -> dict:
    """Bring the testbed up, run ``ngram``, ``draft`` and ``draft_no_agreement`` (or the ``only`` ones), write
    JSON and a PNG. ``log_args``: the agents' and controllers' -v/-q flags (with ``-v`` the head logs every
    trip: γ, drafts kept, ms around the ring and drafting); their logs stay in the testbed's ``logs`` folder
    until its next ``up``.

    Raises:
        HomeringError: not root on Linux, a bad spec, a run that failed.
    """
    from homering.models.dequantize import dequantize_to_f16
    from homering.models.registry import resolve_model
    from homering.testbed import Testbed, default_workdir, load_spec

    console = console or Console(stderr=True)
    smollm2 = resolve_model("smollm2", quiet=True)
    runs = {
        "ngram": (smollm2, "ngram", NGRAM_PROMPTS, False),  # to the end of each answer
        "draft": (dequantize_to_f16(smollm2), str(smollm2), GENERAL_PROMPTS, True),
        "draft_no_agreement": (resolve_model("llama3.2-1b-q4_0", quiet=True), str(smollm2), GENERAL_PROMPTS, True),
    }
    runs = {k: v for k, v in runs.items() if only is None or k in only}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = out_dir / f"speculative-{Path(spec_path).stem}-{stamp}.json"
    results: dict = {"spec": str(spec_path), "tokens": tokens, "started": stamp, "runs": {}}
    with Testbed(load_spec(spec_path), workdir=default_workdir(load_spec(spec_path))) as tb:
        tb.up()
        results["testbed"] = describe_testbed(tb)
        for key, (model, draft, prompts, ignore_eos) in runs.items():
            console.print(f"[bold]{key}[/]: {model.name} with --draft {Path(draft).name}")
            n = tokens if ignore_eos else NGRAM_TOKENS
            bench = SpeculativeBench(
                tb, model, draft=draft, prompts=prompts, tokens=n, ignore_eos=ignore_eos, console=console,
                log_args=log_args,
            )  # fmt: skip
            cfg = RunConfig(key, key, planner="proportional")  # a ring over every device, as for a big model
            results["runs"][key] = {"model": model.name, "draft": Path(draft).name, **bench.run_cluster(cfg)}
            r = results["runs"][key]
            console.print(
                f"  {r['tokens_per_s']:.1f} tokens/s vs {r['plain_tokens_per_s']:.1f} plain "
                f"({r['tokens_per_s'] / max(r['plain_tokens_per_s'], 1e-9):.2f}×), acceptance "
                f"{r['acceptance_rate']:.2f}, mean γ {r['mean_gamma']:.2f}, same tokens: {r['same_tokens']}"
            )
            write_results(results, out.with_suffix(".partial.json"))
    write_results(results, out)
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    _chart(results, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png')}; the processes' logs: {results['testbed']['logs']}")
    return results


def _chart(results: dict, png: Path) -> None:
    """Tokens/s per run, plain and speculative, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["runs"])
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [results["runs"][k]["plain_tokens_per_s"] for k in keys], 0.4, label="plain")
    ax.bar([x + 0.2 for x in xs], [results["runs"][k]["tokens_per_s"] for k in keys], 0.4, label="speculative")
    ax.set_xticks(list(xs), keys)
    ax.set_ylabel("decode tokens/s (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)

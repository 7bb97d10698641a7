"""``--draft``, ``--draft-max`` and ``--draft-min``: speculative decoding on ``up``, ``controller`` and ``agent``.

Checked before anything starts (one line, exit 2): a draft model whose vocabulary is not the target's, a
draft model that does not fit in this machine's available memory, γ outside 1 … GAMMA_MAX.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from homering.engine.drafting import Speculative

GAMMA_MAX = 6
""":data:`homering.engine.drafting.GAMMA_MAX`, here without importing llama.cpp (a test checks they agree)."""
KV_BYTES_PER_VALUE = 2
"""F16 KV cache entries."""


@dataclass(frozen=True)
class DraftSettings:
    """The ``--draft*`` options: ``draft`` is ``ngram``, ``off``, a model name or file, or None (none)."""

    draft: str | None
    n_max: int
    n_min: int

    @property
    def kind(self) -> str | None:
        if self.draft is None:
            return None
        return self.draft if self.draft in ("ngram", "off") else "model"

    def model(self) -> Path | None:
        """The draft model file (a registry name is fetched), or None for ``ngram``/``off``/no draft.

        Raises:
            click.UsageError: the file does not exist and no known model has that name.
        """
        if self.kind != "model":
            return None
        from homering.errors import HomeringError
        from homering.models.registry import resolve_model

        try:
            return resolve_model(self.draft, quiet=True)
        except HomeringError as exc:
            raise click.UsageError(f"--draft: {exc}") from None

    def args(self, model: Path | None) -> tuple[str, ...]:
        """The options for a child process (``up``'s controller)."""
        if self.draft is None:
            return ()
        spec = str(model) if model else self.draft
        return ("--draft", spec, "--draft-max", str(self.n_max), "--draft-min", str(self.n_min))

    def speculative(self, model: Path | None = None) -> Speculative | None:
        """The settings requests get by default (None: no ``--draft``)."""
        if self.kind is None:
            return None
        from homering.engine.drafting import Speculative

        return Speculative(
            draft=self.kind,  # type: ignore[arg-type]
            n_max=self.n_max,
            n_min=self.n_min,
            model_path=str(model) if model else None,
        )

    def check(self, target: Path | None, *, n_ctx: int, n_parallel: int, memory: bool = True) -> Path | None:
        """The draft model, checked against ``target`` (None: not known here) and, with ``memory`` (this
        machine is the head), against this machine's available memory.

        Raises:
            click.UsageError: another vocabulary, too big for the available memory, n_min > n_max.
        """
        if self.n_min > self.n_max:
            raise click.UsageError(f"--draft-min {self.n_min} is above --draft-max {self.n_max}")
        path = self.model()
        if path is None:
            return None
        from homering.models.vocab import vocabulary_mismatch

        why = vocabulary_mismatch(target, path) if target is not None else None
        if why:
            raise click.UsageError(f"--draft: {why}")
        need, free = draft_bytes(path, n_ctx, n_parallel), available_bytes()
        if memory and need > free:
            raise click.UsageError(
                f"--draft: {path.name} needs about {need / 2**20:.0f} MiB (weights and KV cache of {n_parallel} × "
                f"{n_ctx} tokens) but {free / 2**20:.0f} MiB are available"
            )
        return path


def draft_bytes(path: Path, n_ctx: int, n_parallel: int) -> int:
    """Memory a draft model takes on the head: its file (weights) plus an F16 KV cache of ``n_parallel``
    sequences of ``n_ctx`` tokens (an upper bound: K and V of every layer at the full hidden width)."""
    from homering.models.gguf_info import inspect_gguf

    info = inspect_gguf(path)
    kv = 2 * info.n_layers * info.n_embd * KV_BYTES_PER_VALUE * n_ctx * n_parallel
    return path.stat().st_size + kv


def available_bytes() -> int:
    """This machine's available memory (``psutil``), bytes."""
    import psutil

    return int(psutil.virtual_memory().available)


DRAFT_OPTIONS = [
    click.option(
        "--draft",
        default=None,
        metavar="ngram|MODEL|off",
        help="Speculative decoding on the head: 'ngram' (prompt lookup, no model), a small draft model with "
        "the target's vocabulary (a file or a known name), or 'off' [default: off; requests may ask].",
    ),
    click.option(
        "--draft-max",
        type=click.IntRange(1, GAMMA_MAX),
        default=GAMMA_MAX,
        show_default=True,
        help="Most draft tokens verified per trip around the ring (γ).",
    ),
    click.option(
        "--draft-min",
        type=click.IntRange(0, GAMMA_MAX),
        default=0,
        show_default=True,
        help="Fewest draft tokens per trip; γ adapts to the measured acceptance rate in between.",
    ),
]


def draft_options(fn):
    """``--draft``, ``--draft-max``, ``--draft-min``, handed to the command as one ``draft`` argument
    (:class:`DraftSettings`)."""

    @functools.wraps(fn)
    def command(*args, draft, draft_max, draft_min, **kwargs):
        return fn(*args, draft=DraftSettings(draft, draft_max, draft_min), **kwargs)

    for opt in reversed(DRAFT_OPTIONS):
        command = opt(command)
    return command

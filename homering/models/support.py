"""Which architectures homering can split into layer windows that compute exactly what the whole model does.

A layer window is a GGUF of its own (:mod:`homering.models.slicing`), which
llama.cpp loads as a model of fewer layers. That is exact only where nothing
llama.cpp computes depends on the layer count or on a layer's index beyond what
the window's metadata carries. Checked in llama.cpp's source as vendored by
llama-cpp-python 0.3.36 (``src/models/<arch>.cpp``, ``src/llama-model.cpp``) and
by the equivalence tests (greedy tokens of a chain of windows against the unsplit
model, tests/test_equivalence.py, tests/test_moe.py):

==========  =====================================================================
arch        what a window needs
==========  =====================================================================
llama       nothing (Llama 2/3, SmolLM2, Mistral 7B/Nemo/Small, whose GGUFs say ``llama``)
qwen2       nothing (attention biases are block tensors)
qwen3       nothing (the per-head Q/K norms are block tensors)
qwen3moe    nothing (router and experts are block tensors; ``expert_count``, ``expert_used_count`` and
            ``expert_feed_forward_length`` are model-wide, or per-layer arrays that are sliced)
phi3        nothing (fused ``attn_qkv``/``ffn_up`` are block tensors; ``rope_factors_*`` are model-wide
            tensors every window keeps; llama.cpp disables Phi-3's sliding window)
gemma2      the per-layer sliding-window flags as an explicit array (llama.cpp's default pattern counts
            from the window's first layer), and the hidden-state input restored after the graph's
            ``inp_scaled`` (gemma2 scales any input by sqrt(n_embd): :data:`HIDDEN_INPUT_RESTORE`)
gemma3      the per-layer sliding-window flags as an explicit array
==========  =====================================================================

Refused: any other architecture, and Gemma 2 27B / Gemma 3 27B when their
attention scale differs from a window's: llama.cpp picks ``1/sqrt(n_embd /
n_head)`` for a model of exactly 46 (gemma2) or 62 (gemma3) layers and
``1/sqrt(head size)`` for any other count, so their windows would attend differently.
"""

from __future__ import annotations

import os
from pathlib import Path

from homering.errors import ModelError
from homering.models.gguf_file import GGUFFile, read_gguf

SPLITTABLE_ARCHS: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM2, Mistral",
    "qwen2": "Qwen2, Qwen2.5, QwQ",
    "qwen3": "Qwen3 (dense)",
    "qwen3moe": "Qwen3 mixture of experts",
    "phi3": "Phi-3",
    "gemma2": "Gemma 2",
    "gemma3": "Gemma 3",
}
"""llama.cpp architecture → the models it covers: the architectures homering splits into layer windows."""

HIDDEN_INPUT_RESTORE: dict[str, str] = {"gemma2": "inp_scaled"}
"""Architectures whose graph transforms a hidden-state input like a token embedding → the node after which
the window's hook writes the input rows back (:func:`homering.engine.evalhook.restore_input`)."""

_SCALE_BY_TYPE: dict[str, int] = {"gemma2": 46, "gemma3": 62}
"""Architectures whose attention scale is ``1/sqrt(n_embd / n_head)`` at exactly this layer count (the 27B
models) and ``1/sqrt(head size)`` otherwise (llama.cpp's ``load_arch_hparams``)."""


class UnsupportedModel(ModelError):
    """A model homering cannot split into layer windows safely (its message is one line naming why)."""


def split_problem(gf: GGUFFile) -> str | None:
    """Why the model of header ``gf`` cannot be split into layer windows, in one line, or None if it can."""
    arch = gf.arch
    name = gf.path.name
    if arch not in SPLITTABLE_ARCHS:
        return (
            f"{name}: architecture {arch or '(none)'!r} is not supported: homering splits only "
            f"{', '.join(SPLITTABLE_ARCHS)} into layer windows"
        )
    n_layers = int(gf.get(f"{arch}.block_count") or 0)
    if _SCALE_BY_TYPE.get(arch) == n_layers:
        n_embd = int(gf.get(f"{arch}.embedding_length") or 0)
        heads = gf.get(f"{arch}.attention.head_count") or 1
        n_head = int(heads[0] if isinstance(heads, list) else heads)
        head = int(gf.get(f"{arch}.attention.key_length") or n_embd // n_head)
        if n_embd // n_head != head:
            return (
                f"{name}: {arch} with {n_layers} layers is not supported: llama.cpp scales its attention by "
                f"n_embd/n_head = {n_embd // n_head} only at exactly {n_layers} layers (a window would use {head})"
            )
    return None


def check_splittable(path: str | os.PathLike[str]) -> None:
    """Raise :class:`UnsupportedModel` (one line) unless homering can split the model at ``path`` safely.

    Reads only the header. Called where a cluster is set up (controller, ``homering up``, ``homering plan``)
    before any agent loads anything, and by :func:`homering.models.slicing.slice_window`.

    Raises:
        UnsupportedModel: see :func:`split_problem`; ModelError: not a readable GGUF file.
    """
    problem = split_problem(read_gguf(Path(path)))
    if problem:
        raise UnsupportedModel(problem)

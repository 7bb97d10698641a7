"""The names a client may give the served model: one function for every API front door.

A request's ``model`` may be any of the served model's aliases (:func:`model_aliases`): its API id (the GGUF
file name without ``.gguf``, :attr:`ClusterView.model_id`), the file name itself, the short name of
``homering models list`` that pulls that file (``smollm2``; ``docker/.env`` and the README use it), and the GGUF's
own ``general.name``. Names match exactly (the OpenAPI document lists them as the ``model`` enum). Any other
name is a 404 ``model_not_found``. Answers always carry the API id.
"""

from __future__ import annotations

import functools
from pathlib import Path

from homering.api.errors import ApiError
from homering.api.view import ClusterView
from homering.errors import ModelError
from homering.models.gguf_file import read_gguf
from homering.models.registry import KNOWN_MODELS, SYNTHETIC_MODELS

__all__ = ["model_aliases", "resolve_model"]


@functools.lru_cache(maxsize=16)
def _aliases(path: Path) -> tuple[str, ...]:
    names = [path.name.removesuffix(".gguf"), path.name]
    names += [m.name for m in KNOWN_MODELS.values() if m.filename == path.name]
    names += [m.name for m in SYNTHETIC_MODELS.values() if m.filename == path.name]
    try:
        general = read_gguf(path).get("general.name")
    except (ModelError, OSError):  # a file that cannot be read has no name of its own
        general = None
    if isinstance(general, str) and general.strip():
        names.append(general.strip())
    return tuple(dict.fromkeys(names))


def model_aliases(view: ClusterView) -> tuple[str, ...]:
    """Every name of ``view``'s served model, its API id first, no duplicates.

    The GGUF header is read once per model file (cached); a file that cannot be read contributes no
    ``general.name``.
    """
    aliases = _aliases(Path(view.model_path))
    return aliases if aliases[0] == view.model_id else (view.model_id, *aliases)


def resolve_model(view: ClusterView, name: str) -> str:
    """The served model's API id if ``name`` is one of its aliases (:func:`model_aliases`, exactly).

    Raises:
        ApiError: 404 ``model_not_found`` (``param`` ``model``) for any other name; the message lists the
            accepted names.
    """
    aliases = model_aliases(view)
    if name in aliases:
        return view.model_id
    accepted = ", ".join(f"'{a}'" for a in aliases[1:])
    raise ApiError(
        404,
        f"the model '{name}' does not exist; this cluster serves '{view.model_id}' (also named {accepted})",
        code="model_not_found",
        param="model",
    )

"""The API's speculative-decoding field: ``speculative`` (an object), or llama-server's flat keys
``speculative.n_max``, ``speculative.n_min`` (and ``speculative.draft``), folded into it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from homering.wire import GAMMA_MAX, Speculative

FLAT_KEYS = ("draft", "n_max", "n_min")


def _strict_int(v: Any) -> Any:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError("must be an integer")
    return int(v) if isinstance(v, float) else v


StrictInt = BeforeValidator(_strict_int)


class SpeculativeBody(BaseModel):
    """``speculative``: ``draft`` (``ngram``, ``model``: the cluster's draft model, ``off``; default: the
    cluster's ``--draft``), ``n_max``/``n_min``: the range of draft tokens per trip (γ)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    draft: Literal["off", "ngram", "model"] | None = None
    n_max: Annotated[int, Field(ge=1, le=GAMMA_MAX), StrictInt] | None = None
    n_min: Annotated[int, Field(ge=0, le=GAMMA_MAX), StrictInt] | None = None

    def settings(self) -> Speculative:
        """The request's :class:`~homering.wire.Speculative` (fields left out take its defaults)."""
        given = {k: v for k in FLAT_KEYS if (v := getattr(self, k)) is not None}
        n_max = given.get("n_max", GAMMA_MAX)
        return Speculative(**{"n_min": min(given.pop("n_min", 0), n_max), **given})


def fold_flat_keys(data: Any) -> Any:
    """A request body with llama-server's ``speculative.<key>`` fields moved into ``speculative``."""
    if not isinstance(data, dict) or not any(f"speculative.{k}" in data for k in FLAT_KEYS):
        return data
    data = dict(data)
    nested = dict(data.get("speculative") or {})
    for k in FLAT_KEYS:
        if f"speculative.{k}" in data:
            nested[k] = data.pop(f"speculative.{k}")
    data["speculative"] = nested
    return data

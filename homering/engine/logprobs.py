"""Log-probabilities of sampled tokens (OpenAI's ``logprobs`` / ``top_logprobs``), from the head's logits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

LOGPROB_FLOOR = -9999.0
"""What a log-probability of minus infinity is reported as (JSON has no infinity; llama-server does the same)."""


def log_softmax(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """``log(softmax(logits))`` of a ``(n_vocab,)`` vector, in float64: every value finite and at most 0."""
    x = logits.astype(np.float64)
    m = float(np.max(x))
    out = x - m - np.log(np.sum(np.exp(x - m)))
    return np.asarray(np.maximum(out, LOGPROB_FLOOR), dtype=np.float64)


def token_logprobs(
    logits: npt.NDArray[np.float32], token: int, n_top: int, token_bytes: Callable[[int], bytes]
) -> dict[str, Any]:
    """The log-probability of ``token`` under the model (the raw logits' distribution, before sampling
    settings and grammar, as OpenAI reports them) and the ``n_top`` most likely tokens at its position.

    Returns:
        ``{"token_id", "token", "bytes", "logprob", "top": [{same, without "top"}, …]}`` (most likely first), the
        shape of :class:`homering.wire.TokenLogprob`.
    """
    lp = log_softmax(logits)

    def entry(t: int) -> dict[str, Any]:
        raw = token_bytes(t)
        return {"token_id": t, "token": raw.decode(errors="replace"), "bytes": list(raw), "logprob": float(lp[t])}

    top: list[dict[str, Any]] = []
    if n_top > 0:
        idx = np.argpartition(-lp, min(n_top, lp.shape[0] - 1))[:n_top]
        top = [entry(int(t)) for t in sorted(idx.tolist(), key=lambda t: -lp[t])]
    return {**entry(token), "top": top}

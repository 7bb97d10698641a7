"""The head's embedding requests: the prompt through the ring, its final hidden states mean-pooled.

An embed request (:attr:`~homering.wire.GenerateJob.embed`) samples no token. Its prompt is prefilled through
the ring like any other; the head's last window then returns every prompt token's final hidden state after
the output norm, before the vocabulary projection (llama.cpp's per-token embeddings, pooling type NONE:
``llama_get_embeddings_ith``), and the head averages them into one vector of ``n_embd`` floats, which the
``done`` event carries (:attr:`~homering.wire.StreamEvent.embedding`). This is for generative models, which
have no pooling layer of their own (a model with one is refused): mean pooling of the last hidden state, as
llama.cpp's ``--pooling mean`` and sentence-transformers' mean pooling do.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from homering.agent.generation import HeadSession, ring_stall_s
from homering.agent.slots import Interrupted
from homering.engine.window import DecodeError, Floats
from homering.errors import HomeringError
from homering.wire import EventType, Frame, FrameKind, StreamEvent

log = logging.getLogger("homering.agent")


def mean_pool(hidden: Floats) -> Floats:
    """The mean of (n_tokens, n_embd) hidden states over the tokens: (n_embd,) float32 (summed in float64).

    Raises:
        DecodeError: no rows, or a value that is not finite.
    """
    if hidden.ndim != 2 or hidden.shape[0] == 0:
        raise DecodeError(f"no hidden states to pool (shape {hidden.shape})")
    vector = hidden.astype(np.float64).mean(axis=0).astype(np.float32)
    if not np.isfinite(vector).all():
        raise DecodeError("the embedding is not finite")
    return vector


class EmbedSession(HeadSession):
    """One embed request on the head: prefill the prompt, pool the final hidden states, end with ``done``.

    Emits no token events. An interrupted ring ends it with ``interrupted`` and no tokens (the controller
    runs it again on the new ring).
    """

    def run(self) -> StreamEvent:
        """The ``done`` event with the embedding, or ``interrupted``.

        Raises:
            HomeringError, DecodeError: the prompt does not fit, a window failed.
        """
        self.t0 = time.perf_counter()
        try:
            vector = mean_pool(self._hidden())
        except (Interrupted, OSError) as exc:
            log.info("embed request %s interrupted: %s", self.job.request_id, exc)
            return StreamEvent(request_id=self.job.request_id, type=EventType.INTERRUPTED, token_ids=[], error=str(exc))
        return StreamEvent(
            request_id=self.job.request_id,
            type=EventType.DONE,
            token_ids=[],
            prompt_token_ids=self.job.prompt_token_ids,
            finish_reason="stop",
            ttft_ms=(time.perf_counter() - self.t0) * 1000,
            embedding=vector.tolist(),
        )

    def _hidden(self) -> Floats:
        """The prompt's final hidden states after the output norm, (n_prompt, n_embd) float32."""
        n_ctx, prompt = self.ring.plan.n_ctx, np.asarray(self.job.prompt_token_ids, dtype=np.int32)
        if len(prompt) >= n_ctx:
            raise HomeringError(f"the prompt has {len(prompt)} tokens but the context holds {n_ctx}")
        self.slot.embed = True  # before any frame goes out: the head's last window reads it
        self._clear()
        ring, seq = self.ring, self.slot.seq_id
        if len(ring.plan.ring) == 1:  # every round is here: run the windows in turn
            x: np.ndarray = prompt
            last = len(ring.windows) - 1
            for r, w in enumerate(ring.windows):
                out = ring.meter.timed(r, len(prompt), w.forward_many, [(x, 0, seq)], None, [r == last])[0]
                if out.hidden is None:
                    raise DecodeError(f"window {r} gave no hidden states")
                x = out.hidden
            return x
        n_batch = ring.plan.n_batch
        frames = [
            Frame.forward(self.slot.number, seq, i, prompt[i : i + n_batch]) for i in range(0, len(prompt), n_batch)
        ]
        ring.submit(self.slot, frames)
        timeout = ring_stall_s(ring.plan, frames)
        parts: dict[int, np.ndarray] = {}
        for _ in frames:
            self._check_interrupted()
            got = self.slot.wait(timeout)
            if got.header.kind is FrameKind.ERROR:
                raise DecodeError(got.payload)
            if not isinstance(got.payload, np.ndarray) or got.payload.ndim != 2:
                raise DecodeError(f"the ring gave no embeddings for position {got.header.pos}")
            parts[got.header.pos] = got.payload
        return np.concatenate([parts[p] for p in sorted(parts)])

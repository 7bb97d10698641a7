"""The draft model of speculative decoding: a small model with the target's vocabulary, whole on the head.

:class:`ModelDrafter` drafts greedily with its own KV cache (one sequence per request), and drafts the next
trip while a trip is in flight (:meth:`ModelDrafter.draft_ahead`). The prompt-lookup drafter, the settings
and the acceptance rules are in :mod:`homering.engine.drafting`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from homering.engine.window import LayerWindow
from homering.gate import Gate

log = logging.getLogger("homering.engine")

AHEAD_NICE = 19
"""The nice value of a draft model's draft-ahead thread (:meth:`ModelDrafter.draft_ahead`)."""
READY_LAG = 2
"""Tokens of a history a draft sequence may lack and still be :meth:`ModelDrafter.ready`: its next draft then
decodes them with its own first token, in one batch."""


@dataclass
class _Ahead:
    """A draft ahead in flight: the history it assumed, its tokens so far, the future of all of them, and the
    history the next draft follows once the trip is back (``wanted``)."""

    assumed: list[int]
    future: Future[list[int]] | None = None
    tokens: list[int] = field(default_factory=list)
    wanted: list[int] | None = None
    catch_up: bool = False  # started to bring the sequence up to the history (ModelDrafter.ready), not for a draft

    def done(self) -> bool:
        """Whether its drafting has ended (its tokens are all there)."""
        return self.future is None or self.future.done()

    def useless(self) -> bool:
        """Whether it can no longer be the next draft: the trip came back with another history than the
        assumed one plus its first token (as far as that token is known yet)."""
        h, n = self.wanted, len(self.assumed)
        if h is None:
            return False
        return not (len(h) == n + 1 and h[:n] == self.assumed and self.tokens[:1] in ([], [h[n]]))


class ModelDrafter:
    """A small draft model, whole on the head, with its own KV cache of ``n_seq`` sequences.

    Each :meth:`draft` first brings the draft's sequence up to ``history`` (it drops the positions where its
    cache differs, the rejected drafts, and decodes the tokens it lacks), then decodes γ greedy tokens one
    at a time. Its vocabulary must be the target's (:func:`homering.models.vocab.vocabulary_mismatch`).

    Args:
        path: the draft GGUF.
        n_ctx: tokens per sequence (the plan's context).
        n_seq: sequences (the plan's ``n_parallel``).
        n_threads: CPU threads for its decode.

    Raises:
        HomeringError: llama.cpp cannot load the file.
    """

    kind = "model"

    def __init__(self, path: str | Path, *, n_ctx: int, n_seq: int, n_threads: int = 2) -> None:
        self.path = Path(path)
        self.window = LayerWindow(
            path, takes_tokens=True, gives_logits=True, n_ctx=n_ctx, n_batch=256, n_threads=n_threads, n_seq_max=n_seq
        )
        self._cached: dict[int, list[int]] = {}  # the tokens in each sequence's draft KV cache
        self._catch_up: dict[int, float] = {}  # each sequence's last catch-up, ms
        self._ahead: dict[int, _Ahead] = {}  # seq → its draft ahead
        self.ahead_kept = self.ahead_lost = 0  # drafts ahead that were the next draft, and that were not
        self._token_ms: float | None = None  # a drafted token's decode time, ms (drafts on the caller's thread)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="draft-ahead", initializer=_yield_to_the_ring)
        self._lock = threading.Lock()
        self._gate = Gate()  # the sessions using it: close() frees the model when the last one releases it

    def catch_up_ms(self, seq_id: int) -> float:
        """The last :meth:`draft` of ``seq_id``'s time bringing its draft sequence up to the history, beyond one
        token, ms (0 when it lacked one token, or never drafted). Kept per sequence: two requests drafting
        at once on the head each read their own."""
        with self._lock:
            return self._catch_up.get(seq_id, 0.0)

    @property
    def token_ms(self) -> float:
        """Ms a draft token takes when the head waits for it (moving average of :meth:`draft`'s one-token
        decodes; drafts ahead, at the lowest priority beside the ring, are not timed); 0 before the first."""
        with self._lock:
            return self._token_ms or 0.0

    def ready(self, seq_id: int, history: list[int]) -> bool:
        """Whether a draft after ``history`` would cost only its own tokens: a draft ahead of ``seq_id`` is
        drafting (the draft waits for its tokens, as :meth:`draft` says), or the draft sequence lacks at most
        :data:`READY_LAG` of the history's tokens. If not, a draft ahead of one token starts bringing the
        sequence up to ``history`` on the drafter's thread (unless one does already), so that a head which
        can decode plainly meanwhile never waits for a catch-up (469 ms on home4's head for a prompt and the 37
        tokens after it, a probe's stall before this check)."""
        with self._lock:
            ahead = self._ahead.get(seq_id)
            cached = self._cached.get(seq_id, [])
        if ahead is not None and not ahead.done():
            return not ahead.catch_up
        if len(history) - _common_prefix(cached, history) <= READY_LAG:
            return True
        self.draft_ahead(seq_id, history, 1, catch_up=True)
        return False

    def draft(self, seq_id: int, history: list[int], gamma: int) -> list[int]:
        """Up to ``gamma`` greedy draft tokens to follow ``history``; fewer near the end of the context.

        When a :meth:`draft_ahead` of ``seq_id`` guessed right (``history`` is what it assumed plus its first
        token), its further tokens are the draft, as far as they go: a greedy draft of ``h + [g0]`` is the
        rest of the greedy draft ``g0, g1, …`` of ``h``. Otherwise the draft starts from where its cache and
        ``history`` part."""
        ahead = self._settle(seq_id, history)
        if ahead is not None:
            if ahead.tokens and not ahead.useless():
                ready = ahead.tokens[1 : 1 + gamma]
                with self._lock:
                    self._catch_up[seq_id] = 0.0
                    self.ahead_kept += 1
                if len(ready) >= gamma:
                    return ready
                return ready + self._draft(seq_id, history + ready, gamma - len(ready), timed=True)
            with self._lock:
                self.ahead_lost += 1
        return self._draft(seq_id, history, gamma, timed=True)

    def draft_ahead(self, seq_id: int, history: list[int], n: int, *, catch_up: bool = False) -> None:
        """Start drafting ``n`` tokens to follow ``history`` on a thread of the drafter's own, while the trip
        that verifies ``history``'s drafts is in flight; the next :meth:`draft` of ``seq_id`` waits for it.

        If the trip keeps every draft and its one extra token is this draft's first (probability about
        α^(γ+1)), the next trip's draft is ready: drafting overlaps the ring's hops and the other devices'
        compute instead of adding to them. A wrong guess costs the head CPU time during the trip, and the
        next draft drops its cache back to where it parts from the history (as after a rejection): the trip's
        outcome stops it after the token it is decoding (:meth:`draft`). The idea is the asynchronous drafting
        of pipelined speculative decoding (e.g. PipeSpec, McDanel et al. 2025). ``catch_up``: it is started
        to bring the sequence up to ``history`` (:meth:`ready`)."""
        if n <= 0:
            return
        self._settle(seq_id)
        ahead = _Ahead(list(history), catch_up=catch_up)
        ahead.future = self._pool.submit(self._draft, seq_id, ahead.assumed, n, ahead=ahead)
        with self._lock:
            self._ahead[seq_id] = ahead

    def _settle(self, seq_id: int, history: list[int] | None = None) -> _Ahead | None:
        """Wait for ``seq_id``'s draft ahead, if any, and return it, ended; None: none, or it failed (a draft
        that follows starts over from the cache and says what is wrong). With the ``history`` the next draft
        follows (its ``wanted``), a draft ahead that cannot lead to it stops at once (after the token it is
        decoding): the head waits for what it needs, not for a wrong guess to finish."""
        with self._lock:
            ahead = self._ahead.pop(seq_id, None)
        if ahead is None or ahead.future is None:
            return None
        ahead.wanted = history  # from now on it stops at the first token that shows it useless
        try:
            ahead.future.result()
            return ahead
        except Exception as e:  # noqa: BLE001 - the drafting that follows meets it again, on the caller's thread
            log.debug("a draft ahead failed: %s", e)
            return None

    def _draft(
        self, seq_id: int, history: list[int], gamma: int, *, timed: bool = False, ahead: _Ahead | None = None
    ) -> list[int]:
        """Bring the draft sequence up to ``history`` and decode up to ``gamma`` greedy tokens; a draft
        ``ahead`` shows its tokens as they come and ends as soon as it is of no use."""
        gamma = min(gamma, self.window.n_ctx - len(history))
        out: list[int] = ahead.tokens if ahead is not None else []
        if gamma <= 0 or (ahead is not None and ahead.useless()):
            return out
        with self._lock:
            cached = self._cached.get(seq_id, [])
        same = _common_prefix(cached, history)
        same = min(same, len(history) - 1)  # the last token is decoded again: its logits are wanted
        self.window.kv_remove(seq_id, same)
        t0 = time.perf_counter()
        logits = self.window.forward(np.asarray(history[same:], dtype=np.int32), same, seq_id).logits
        t1 = time.perf_counter()
        catch_up = (t1 - t0) * 1000 if len(history) - same > 1 else 0.0
        pos = len(history)
        while logits is not None:
            out.append(int(np.argmax(logits)))
            if len(out) == gamma or (ahead is not None and ahead.useless()):
                break
            logits = self.window.forward(np.asarray(out[-1:], dtype=np.int32), pos, seq_id).logits
            pos += 1
        t2, steps = time.perf_counter(), len(out) - (1 if catch_up else 0)  # one-token decodes
        with self._lock:
            self._cached[seq_id] = list(history) + out[:-1]
            self._catch_up[seq_id] = catch_up
            if timed and steps > 0:
                ms = ((t2 - t0) if not catch_up else (t2 - t1)) * 1000 / steps
                self._token_ms = ms if self._token_ms is None else 0.8 * self._token_ms + 0.2 * ms
        return out

    def forget(self, seq_id: int) -> None:
        """A request ended: its draft sequence starts over next time (a draft ahead stops after its token)."""
        self._settle(seq_id, [])
        with self._lock:
            self._cached.pop(seq_id, None)
            self._catch_up.pop(seq_id, None)
        self.window.kv_remove(seq_id, 0)

    def acquire(self) -> bool:
        """A session starts using the draft model; False once it is closing (take another)."""
        return self._gate.enter()

    def release(self) -> None:
        """A session is done with it: the model is freed now if :meth:`close` was called meanwhile."""
        self._gate.exit()

    def close(self) -> None:
        """Free the model, or, while sessions use it (a plan changed under a request), once the last releases
        it (:class:`~homering.gate.Gate`)."""
        self._gate.close(then=self._free)

    def _free(self) -> None:
        self._pool.shutdown(wait=True)  # a draft ahead still running uses the window
        self.window.close()


def _yield_to_the_ring() -> None:
    """Run this thread (the draft ahead) at the lowest priority: while the trip it overlaps computes the head's
    own window, that window goes first (the trip waits for it; the draft is wanted only when the trip is back).
    Linux sets a thread's nice value by its id; elsewhere, or without the right, the thread keeps its own."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), AHEAD_NICE)
    except (AttributeError, OSError) as e:
        log.debug("the draft-ahead thread keeps its priority: %s", e)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n

"""``LayerWindow``: one layer window of a model on the llama-cpp-python low-level API.

How a window talks to llama.cpp (design.md, facts 2, 3, 5 and 6):

- input is token ids (``first``/``whole`` windows) or hidden states: a
  ``llama_batch`` created with ``embd = n_embd`` carries float rows and the
  graph skips the embedding lookup;
- output is logits (``last``/``whole`` windows, last token of the batch) or
  hidden states: the context's ``cb_eval`` callback asks for the node
  ``l_out-<n_layer-1>``, copies it out with ``ggml_backend_tensor_get`` and
  returns false, which stops the scheduler before the output norm and the
  vocabulary projection (a hook in C, :mod:`homering.engine.evalhook`: the
  scheduler asks it about every node). Every token is then marked as an output, or the last
  layer would keep only the output rows;
- llama_decode releases the GIL: callers run :meth:`LayerWindow.forward_many`
  in threads of their own (the agent does) while an asyncio loop keeps serving
  MQTT and TCP; a window serialises the calls it gets with a lock.

Sampling is the head's: :class:`~homering.engine.sampling.SamplerChain` over a
copy of the logits (:attr:`WindowOutput.logits`, or :meth:`LayerWindow.sample`
for the last forward's).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from homering.engine import prefetch, streaming
from homering.engine.backend import context_params, init_backend, model_arch, model_params, token_piece
from homering.engine.backend import plain_llama as plain_llama  # where the benchmarks and tests import it from
from homering.engine.batches import EXACT_BATCH, Item, Piece, exact_batch, fill_batch, pack_batches
from homering.engine.evalhook import EvalHook, new_hook, restore_input, user_data
from homering.engine.outputs import embedding_mode, read_rows
from homering.engine.prefetch import ExpertPrefetch
from homering.engine.streaming import TailStream
from homering.errors import HomeringError
from homering.models.support import HIDDEN_INPUT_RESTORE

if TYPE_CHECKING:
    from homering.engine.sampling import SamplerChain

Floats = npt.NDArray[np.float32]
"""float32 rows: hidden states (n_tokens, n_embd) or logits (n_vocab,)."""


class DecodeError(HomeringError):
    """llama_decode failed (for example: no KV slot left, the context is full)."""


@dataclass
class WindowOutput:
    """What one forward pass returns.

    Exactly one of the fields is set:
        hidden: (n_tokens, n_embd) float32, the residual stream after the
            window's last layer;
        logits: (n_vocab,) float32, the last token's logits (``last``/``whole``);
            (n, n_vocab) for an item of :meth:`LayerWindow.forward_many` that asks for every row's.
    """

    hidden: Floats | None = None
    logits: Floats | None = None


def _wire_hook(
    w: LayerWindow, cparams: llama_cpp.llama_context_params, stream_from: int | None, prefetch_experts: bool
) -> tuple[EvalHook | None, TailStream | None, ExpertPrefetch | None]:
    """The graph hook ``w`` needs, wired into ``cparams`` (None: none: it gives logits, nothing else to do),
    and the tail streaming and expert prefetch wired into it. Raises what they raise."""
    restore = None if w.takes_tokens else HIDDEN_INPUT_RESTORE.get(model_arch(w._model))
    streams = stream_from is not None and streaming.SUPPORTED
    prefetch_experts = prefetch_experts and bool(prefetch.expert_tensors(w.path))  # a dense window: nothing
    if w.gives_logits and not (restore or prefetch_experts or streams):
        return None, None, None
    hook, cparams.cb_eval = new_hook(b"" if w.gives_logits else w._target)
    cparams.cb_eval_user_data = user_data(hook)
    if restore:
        restore_input(hook, restore.encode())
    stream = TailStream(w.path, hook, stream_from) if streams and stream_from is not None else None
    try:
        tokens = w.takes_tokens and prefetch_experts
        lookup = streaming.unread_span(w.path, gives_logits=w.gives_logits) if tokens else None
        return hook, stream, ExpertPrefetch(w.path, hook, w.n_batch, lookup) if prefetch_experts else None
    except BaseException:
        if stream is not None:
            stream.close()
        raise


class LayerWindow:
    """A llama.cpp model + context that runs one layer window.

    Args:
        path: a window GGUF (see :mod:`homering.models.slicing`) or a whole model.
        takes_tokens: the window starts at layer 0 (it embeds token ids).
        gives_logits: the window ends at the model's last layer and computes logits.
        n_ctx: KV cache size in tokens of one sequence.
        n_batch: the largest batch one llama_decode gets; longer inputs are
            split (a ubatch equals a batch, so the hidden-state hook sees
            whole batches).
        n_threads: CPU threads for decode.
        n_seq_max: sequences (seq_id 0 … n_seq_max-1) the KV cache holds: it
            has ``n_ctx × n_seq_max`` cells, shared (llama.cpp's unified KV
            cache, so one batch can carry several sequences); the caller keeps
            each sequence within ``n_ctx`` tokens.
        n_gpu_layers: layers to offload when llama.cpp has a GPU backend.
        stream_from: the first layer (the window's own index) whose weights stream from disk every graph
            (a device in overflow mode, :mod:`homering.engine.streaming`); None: the kernel decides.

    Each window has its own KV cache; positions are explicit, so a window
    can be fed any part of a sequence in order.

    Raises:
        HomeringError: the file cannot be loaded by llama.cpp.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        takes_tokens: bool,
        gives_logits: bool,
        n_ctx: int = 2048,
        n_batch: int = 256,
        n_threads: int = 2,
        n_seq_max: int = 1,
        n_gpu_layers: int = 0,
        stream_from: int | None = None,
        prefetch_experts: bool = False,
        verbose: bool = False,
    ) -> None:
        init_backend(verbose)
        self.path = Path(path)
        self.takes_tokens = takes_tokens
        self.gives_logits = gives_logits
        self.n_batch = n_batch
        self._lock = threading.Lock()

        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), model_params(n_gpu_layers))
        if not self._model:
            raise HomeringError(f"llama.cpp could not load {self.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_layer = llama_cpp.llama_model_n_layer(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.exact_batch = exact_batch(self.path)
        self._target = f"l_out-{self.n_layer - 1}".encode()

        cparams = context_params(n_ctx, n_batch, n_seq_max, n_threads)
        self._last_logits: Floats | None = None  # the last item's of the last forward, for sample()
        self.stream: TailStream | None = None
        self.experts: ExpertPrefetch | None = None
        try:
            self._hook, self.stream, self.experts = _wire_hook(
                self, cparams, stream_from, prefetch_experts and prefetch.SUPPORTED
            )
        except (HomeringError, OSError, ValueError):
            self._close_stream()
            llama_cpp.llama_model_free(self._model)
            raise
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self._close_stream()
            llama_cpp.llama_model_free(self._model)
            raise HomeringError(f"llama.cpp could not create a context for {self.path} (n_ctx={n_ctx})")
        self.n_ctx_total = llama_cpp.llama_n_ctx(self._ctx)
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        embd = 0 if takes_tokens else self.n_embd
        self._batch = llama_cpp.llama_batch_init(n_batch, embd, 1)
        self._closed = False

    # ------------------------------------------------------------ forward
    def forward(self, inputs: npt.NDArray[Any], pos: int, seq_id: int = 0) -> WindowOutput:
        """Run the window on a contiguous run of one sequence's tokens.

        Args:
            inputs: token ids, shape (n,) int32, for token windows; hidden
                states, shape (n, n_embd) float32, otherwise.
            pos: position of the first input; the inputs get pos, pos+1, …
            seq_id: the sequence (KV cache stream) these tokens belong to.

        Returns:
            :class:`WindowOutput`: hidden states for every input, or the
            logits of the last input.

        Raises:
            DecodeError: llama_decode failed (context full, …).
            ValueError: inputs of the wrong shape or dtype.
        """
        return self.forward_many([(inputs, pos, seq_id)])[0]

    def forward_many(
        self, items: list[Item], rows: list[bool] | None = None, embed: list[bool] | None = None
    ) -> list[WindowOutput]:
        """Run several runs of tokens, of one or several sequences, in as few llama_decode calls as fit.

        ``items`` are ``(inputs, pos, seq_id)`` as for :meth:`forward`; they are
        packed in order into batches of at most ``n_batch`` tokens (an item
        longer than that is split), so the weights are read once for all
        sequences of a batch (llama.cpp's server does the same with its
        slots). Returns one :class:`WindowOutput` per item. A window that gives
        logits returns (n, n_vocab) logits, one row per token, for the items whose
        ``rows`` entry is true (a speculative verification, at most ``n_batch`` tokens); ``embed`` items get
        ``hidden``: every token's embedding, (n, n_embd) float32 (:mod:`homering.engine.outputs`).

        Raises:
            DecodeError: llama_decode failed (context full, …).
            ValueError: inputs of the wrong shape or dtype, a sequence that does not exist, positions
                outside [0, n_ctx), or a ``rows`` item longer than :data:`EXACT_BATCH` tokens.
        """
        arrays = [self._check_inputs(x) for x, _, _ in items]
        flagged = [bool(r) for r in rows] if rows else [False] * len(items)
        if any(r and a.shape[0] > min(self.n_batch, EXACT_BATCH) for r, a in zip(flagged, arrays)):
            raise ValueError(f"a verification has at most {min(self.n_batch, EXACT_BATCH)} tokens")
        embeds = [bool(e) and self.gives_logits for e in embed] if embed else [False] * len(items)
        rows = [(r and self.gives_logits) or e for r, e in zip(flagged, embeds)]
        for arr, (_, pos, seq_id) in zip(arrays, items):
            self._check_place(seq_id, pos, arr.shape[0])
        # every item's hidden states, one after another: a batch of pieces is a run of these rows,
        # which the hook fills directly
        hidden = None if self.gives_logits else np.empty((sum(a.shape[0] for a in arrays), self.n_embd), np.float32)
        logits: list[Floats | None] = [None] * len(items)
        with self._lock:
            if self._closed:
                raise DecodeError("window is closed")
            done, start = 0, [0] * len(items)  # where each item's rows begin in ``hidden``
            for group in pack_batches(arrays, self.n_batch, flagged, self.exact_batch):
                total = sum(n for _, _, n in group)
                for k, (i, off, _) in enumerate(group):
                    if off == 0:
                        start[i] = done + sum(n for _, _, n in group[:k])
                out = None if hidden is None else hidden[done : done + total]
                with embedding_mode(self._ctx, any(embeds[i] for i, _, _ in group), self.path.name):
                    self._decode(group, (arrays, rows), items, total, out, logits, embeds)
                done += total
            if self._hook is not None:
                self._hook.dst, self._hook.capacity = None, 0
            if hidden is None and logits:
                last = logits[-1]
                self._last_logits = last[-1] if last is not None and last.ndim == 2 else last
        if hidden is None:
            return [WindowOutput(hidden=lg) if e else WindowOutput(logits=lg) for lg, e in zip(logits, embeds)]
        return [WindowOutput(hidden=hidden[a : a + arr.shape[0]]) for a, arr in zip(start, arrays)]

    def _decode(
        self,
        group: list[Piece],
        inputs: tuple[list[npt.NDArray[Any]], list[bool]],
        items: list[Item],
        total: int,
        hidden: Floats | None,
        logits: list[Floats | None],
        embeds: list[bool],
    ) -> None:
        """One llama_decode of ``group`` (pieces of items, ``total`` tokens; ``inputs``: the items' arrays and
        whether each wants every row's logits); the hidden states land in ``hidden`` ((total, n_embd) rows),
        or each finished item's last logits (all rows for ``rows``, with ``embeds``: embeddings) in ``logits``."""
        b = self._batch
        b.n_tokens = total
        arrays, rows = inputs
        placed = fill_batch(
            b,
            group,
            arrays,
            items,
            row_floats=0 if self.takes_tokens else self.n_embd,
            every_row=hidden is not None,
            rows=rows,
        )
        hook = self._hook
        if hidden is not None and hook is not None:
            # the hook copies l_out of the whole batch here (batch order: llama.cpp's unified KV cache
            # splits a batch into ubatches in order, and a ubatch is a whole batch)
            hook.dst, hook.capacity, hook.filled = hidden.ctypes.data, hidden.nbytes, 0
        if hook is not None and hook.restore:
            hook.src, hook.src_bytes, hook.restored = ctypes.addressof(b.embd.contents), total * self.n_embd * 4, 0
        rc = llama_cpp.llama_decode(self._ctx, b)
        if rc != 0:
            raise DecodeError(
                f"llama_decode failed with code {rc} for {total} token(s) (KV cache of {self.n_ctx_total} cells, full?)"
            )
        if hook is not None and hook.restore and not hook.restored:
            raise DecodeError(f"the graph of {self.path.name} never produced {hook.restore.decode()} to restore")
        if hidden is not None:
            if hook is None or not hook.filled:
                raise DecodeError(
                    f"the graph of {self.path.name} never produced {self._target.decode()} for {total} tokens"
                )
        else:
            for i, off, r, n, is_last in placed:
                if rows[i]:  # every row, piece by piece: the item's (n_tokens, n_vocab) logits or embeddings
                    width = self.n_embd if embeds[i] else self.n_vocab
                    read_rows(self._ctx, logits, i, (arrays[i].shape[0], width), (off, r, n), embed=embeds[i])
                elif is_last:
                    ptr = llama_cpp.llama_get_logits_ith(self._ctx, r + n - 1)
                    logits[i] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _check_inputs(self, inputs: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if self.takes_tokens:
            arr = np.ascontiguousarray(inputs, dtype=np.int32)
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(f"token window wants (n,) token ids, got shape {arr.shape}")
            if arr.min() < 0 or arr.max() >= self.n_vocab:
                raise ValueError("token id out of the vocabulary")
            return arr
        arr = np.ascontiguousarray(inputs, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.n_embd or arr.shape[0] == 0:
            raise ValueError(f"hidden-state window wants (n, {self.n_embd}) float32, got {arr.shape}")
        return arr

    # ------------------------------------------------------------ KV cache
    def _check_place(self, seq_id: int, pos: int, n: int) -> None:
        """Raise ValueError unless ``seq_id`` exists and positions ``pos`` … ``pos + n - 1`` fit its context
        (llama.cpp would abort, or reinterpret seq_id -1 as every sequence)."""
        if not 0 <= seq_id < self.n_seq_max:
            raise ValueError(f"sequence {seq_id} does not exist (the window holds {self.n_seq_max})")
        if not (0 <= pos and pos + n <= self.n_ctx):
            raise ValueError(f"positions {pos} … {pos + n - 1} outside the context of {self.n_ctx}")

    def kv_remove(self, seq_id: int, p0: int = 0) -> None:
        """Drop positions >= ``p0`` of ``seq_id`` (p0 = 0 clears the sequence).

        Raises:
            ValueError: a sequence that does not exist, or a negative ``p0``.
        """
        self._check_place(seq_id, 0, 0)
        if p0 < 0:
            raise ValueError(f"position {p0} is negative")
        p0 = min(p0, self.n_ctx)
        with self._lock:
            llama_cpp.llama_memory_seq_rm(self._mem, seq_id, p0, -1)

    def sample(self, sampler: SamplerChain) -> int:
        """Sample the next token with ``sampler`` from the logits of the last forward (``last``/``whole``
        windows; of its last item, for :meth:`forward_many`).

        Raises:
            ValueError: the window gives no logits, or has not run a forward yet.
        """
        with self._lock:
            logits = self._last_logits
        if logits is None:
            raise ValueError(
                f"{self.path.name} has no logits to sample from (no forward yet, or a window that gives hidden states)"
            )
        return sampler.sample(logits)

    # ------------------------------------------------------------ vocabulary
    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (needs a window with a vocabulary)."""
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of a token's text (special tokens are not rendered)."""
        return token_piece(self.vocab, token, special=False)

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free the batch, the context and the model. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._close_stream()
            llama_cpp.llama_model_free(self._model)

    def _close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.experts is not None:
            self.experts.close()
            self.experts = None

    def __enter__(self) -> LayerWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

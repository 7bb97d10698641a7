"""llama.cpp's process-wide parts: backend start-up, the ggml calls the window engine makes, token text.

Every llama.cpp object of this package (:class:`~homering.engine.window.LayerWindow`,
:class:`~homering.engine.tokenizer.Tokenizer`) calls :func:`init_backend` first. :func:`plain_llama` builds
the unsplit reference the equivalence tests and the benchmarks compare windows with.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import _ggml

ggml = _ggml.libggml
ggml.ggml_get_name.argtypes = [ctypes.c_void_p]
ggml.ggml_get_name.restype = ctypes.c_char_p
ggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
ggml.ggml_nbytes.restype = ctypes.c_size_t
ggml.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
ggml.ggml_backend_tensor_get.restype = None
ggml.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
ggml.ggml_backend_tensor_set.restype = None

_backend_lock = threading.Lock()
_backend_ready = False


def init_backend(verbose: bool) -> None:
    """Initialise llama.cpp's backends once per process; unless ``verbose``, silence its log first."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            if not verbose:
                llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _silent_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:  # pragma: no cover - C callback
    return None


def token_piece(vocab: llama_cpp.llama_vocab_p, token: int, *, special: bool) -> bytes:
    """The bytes of one token's text (``special``: render control tokens such as ``<|im_end|>``)."""
    if token < 0:
        return b""
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:n]


def model_params(n_gpu_layers: int) -> llama_cpp.llama_model_params:
    """A window's model parameters: memory-mapped weights, not repacked, ``n_gpu_layers`` offloaded."""
    params: llama_cpp.llama_model_params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP  # memory-mapped, never locked
    # No CPU weight repacking (llama.cpp's --no-repack): on CPUs with AVX2/NEON llama.cpp
    # otherwise copies Q4_0 weights into anonymous RAM (the CPU_REPACK buffer), so a window
    # would neither stay memory-mapped nor be reclaimable page cache. Costs ~20% decode speed.
    params.use_extra_bufts = False
    return params


def model_arch(model: llama_cpp.llama_model_p) -> str:
    """A loaded model's ``general.architecture`` (``""`` when it has none)."""
    buf = ctypes.create_string_buffer(128)
    n = llama_cpp.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf))
    return buf.value.decode() if n >= 0 else ""


def context_params(n_ctx: int, n_batch: int, n_seq_max: int, n_threads: int) -> llama_cpp.llama_context_params:
    """A window's context parameters: one unified KV cache of ``n_ctx`` cells per sequence for ``n_seq_max``
    sequences, batches of ``n_batch`` tokens (a ubatch is a whole batch), ``n_threads`` CPU threads."""
    params: llama_cpp.llama_context_params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_ctx * n_seq_max
    params.kv_unified = True  # one cache for every sequence: a batch may mix sequences, kept in order
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = n_seq_max
    params.n_threads = n_threads
    params.n_threads_batch = n_threads
    params.no_perf = True
    return params


def plain_llama(path: str | Path, **kwargs: Any) -> llama_cpp.Llama:
    """The whole model in a plain ``llama_cpp.Llama`` with the same weight layout as a
    :class:`~homering.engine.window.LayerWindow`.

    ``kwargs`` go to ``llama_cpp.Llama``. Like the windows it does not repack
    weights (llama.cpp's ``--no-repack``): the high-level API has no switch for
    it, so the default model parameters are patched for the constructor call.
    Repacked and plain kernels round differently, so the unsplit references of
    the equivalence tests and the baselines of the benchmarks go through here.
    """
    import llama_cpp.llama_cpp as low  # the module llama_cpp.Llama takes its defaults from

    default_params = low.llama_model_default_params

    def no_repack() -> llama_cpp.llama_model_params:
        params: llama_cpp.llama_model_params = default_params()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = no_repack
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        low.llama_model_default_params = default_params

"""The layer window's ``cb_eval`` hook, in C (``_evalhook.c``, built with the package).

A window that gives hidden states stops llama.cpp's graph at the node ``l_out-<n_layer-1>`` and copies that
node out (design.md, fact 3). llama.cpp's scheduler asks the hook about every node of the graph, about 30
per layer and token; a Python callback there cost ~0.4 ms per token on a 10-layer SmolLM2 window, as much
as a network hop. The C hook answers in nanoseconds and gives the same bytes.

The hook also streams a window's tail (:class:`~homering.engine.streaming.TailStream`): on a device in
overflow mode, the weight pages of each tail layer are dropped as soon as the layer's output is computed, so
the page cache never evicts the layers the device keeps (see ``_evalhook.c``). And it prefetches a mixture
of experts' routed experts (:class:`~homering.engine.prefetch.ExpertPrefetch`) once each layer's router has
chosen them.

The library has no Python API: it is loaded with ctypes, and the ggml functions it calls are handed to it
as pointers in :class:`EvalHook`, so it links against no library of its own.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Callable
from functools import cache
from typing import cast

import llama_cpp

from homering.engine.backend import ggml
from homering.errors import HomeringError

EvalCallback = Callable[[ctypes.c_void_p, bool], bool]
"""How llama-cpp-python types ``llama_context_params.cb_eval`` (the pointer is a C function here)."""
MAX_NAME = 64
"""GGML_MAX_NAME: the longest tensor name, with its NUL."""


class EvalHook(ctypes.Structure):
    """``struct hr_eval_hook`` of ``_evalhook.c``: what the hook needs, and where it puts the node's data.

    Fields: the three ggml functions (pointers), ``dst``/``capacity`` (the buffer for the target node, bytes;
    a node of another size is not copied), ``filled`` (1 once copied) and ``target`` (the node's name, empty
    for none); then the tail streaming: ``fd`` (the window file, -1 when nothing streams), ``stream_first``
    (the first streamed layer), ``n_layers``/``layers`` (one :class:`LayerPages` per layer) and ``dropped``
    (layers dropped so far); then the input restore: ``tensor_set`` (a ggml function), ``src``/``src_bytes``
    (the batch's input rows), ``restored`` (1 once written) and ``restore`` (the node written over with them,
    empty for none; see :func:`restore_input`); then the expert prefetch
    (:class:`~homering.engine.prefetch.ExpertPrefetch`): ``moe_layers`` (0: none), ``moe_tensors`` and
    ``n_expert``, ``experts`` (``moe_layers × moe_tensors`` :class:`ExpertSlices`), ``ids``/``ids_bytes`` (scratch
    for the router's choices), ``prefetched`` (expert slices advised so far) and two ggml functions.
    """

    _fields_ = [
        ("get_name", ctypes.c_void_p),
        ("nbytes", ctypes.c_void_p),
        ("tensor_get", ctypes.c_void_p),
        ("dst", ctypes.c_void_p),
        ("capacity", ctypes.c_size_t),
        ("filled", ctypes.c_int),
        ("target", ctypes.c_char * MAX_NAME),
        ("fd", ctypes.c_int),
        ("stream_first", ctypes.c_int),
        ("n_layers", ctypes.c_int),
        ("layers", ctypes.c_void_p),
        ("dropped", ctypes.c_longlong),
        ("tensor_set", ctypes.c_void_p),
        ("src", ctypes.c_void_p),
        ("src_bytes", ctypes.c_size_t),
        ("restored", ctypes.c_int),
        ("restore", ctypes.c_char * MAX_NAME),
        ("moe_layers", ctypes.c_int),
        ("moe_tensors", ctypes.c_int),
        ("n_expert", ctypes.c_int),
        ("experts", ctypes.c_void_p),
        ("ids", ctypes.c_void_p),
        ("ids_bytes", ctypes.c_size_t),
        ("prefetched", ctypes.c_longlong),
        ("nelements", ctypes.c_void_p),
        ("nrows", ctypes.c_void_p),
    ]


class LayerPages(ctypes.Structure):
    """``struct hr_layer_pages``: the whole pages to drop once a layer is computed, in the mapping (``addr``,
    0 when unknown) and in the file (``offset``), ``length`` bytes (0: none)."""

    _fields_ = [
        ("addr", ctypes.c_size_t),
        ("length", ctypes.c_size_t),
        ("offset", ctypes.c_longlong),
    ]


class ExpertSlices(ctypes.Structure):
    """``struct hr_expert_slices``: one expert tensor of a layer in llama.cpp's mapping: expert ``e`` lies at
    ``addr + e·stride`` (``addr`` 0: unknown, skipped)."""

    _fields_ = [("addr", ctypes.c_size_t), ("stride", ctypes.c_size_t)]


@cache
def _library() -> ctypes.CDLL:
    spec = importlib.util.find_spec("homering.engine._evalhook")
    if spec is None or not spec.origin:
        raise HomeringError(
            "homering's C graph hook (homering.engine._evalhook) is not built: reinstall homering "
            "(`pip install -e .` or `make install`), which needs a C compiler"
        )
    return ctypes.CDLL(spec.origin)


def new_hook(target: bytes) -> tuple[EvalHook, EvalCallback]:
    """A hook for the node named ``target`` (e.g. ``b"l_out-9"``; ``b""``: none) and the C callback to give
    llama.cpp. Nothing streams until a :class:`~homering.engine.streaming.TailStream` is wired into it.

    Set ``cparams.cb_eval`` to the callback and ``cparams.cb_eval_user_data`` to the hook's address
    (:func:`user_data`); keep the hook alive as long as the context.

    Raises:
        HomeringError: the C library is not built; ValueError: a name of 64 bytes or more.
    """
    if len(target) >= MAX_NAME:
        raise ValueError(f"tensor name {target!r} is longer than ggml's {MAX_NAME - 1} bytes")
    hook = EvalHook()
    for field, fn in (
        ("get_name", ggml.ggml_get_name),
        ("nbytes", ggml.ggml_nbytes),
        ("tensor_get", ggml.ggml_backend_tensor_get),
        ("tensor_set", ggml.ggml_backend_tensor_set),
        ("nelements", ggml.ggml_nelements),
        ("nrows", ggml.ggml_nrows),
    ):
        setattr(hook, field, ctypes.cast(fn, ctypes.c_void_p).value)
    hook.target = target
    hook.fd, hook.stream_first = -1, 1 << 30
    callback = ctypes.cast(_library().hr_eval_hook, llama_cpp.ggml_backend_sched_eval_callback)
    return hook, cast(EvalCallback, callback)


def user_data(hook: EvalHook) -> ctypes.c_void_p:
    """The hook's address, as ``cb_eval_user_data``."""
    return ctypes.c_void_p(ctypes.addressof(hook))


def restore_input(hook: EvalHook, node: bytes) -> None:
    """Make the hook write a decode's input rows over the graph node ``node`` once it is computed.

    For architectures whose graph transforms hidden-state input as if it were token embeddings (llama.cpp's
    gemma2 multiplies it by sqrt(n_embd), node ``inp_scaled``): the layers then see exactly the rows the
    previous window produced. Before each decode, set ``hook.src``/``hook.src_bytes`` to the batch's rows and
    ``hook.restored`` to 0; ``restored`` is 1 afterwards when the node was found and written.
    """
    if len(node) >= MAX_NAME:
        raise ValueError(f"tensor name {node!r} is longer than ggml's {MAX_NAME - 1} bytes")
    hook.restore = node

"""Slicing: standalone window files with renumbered blocks and sliced per-layer metadata."""

from __future__ import annotations

import os

import numpy as np

from homering.models.gguf_file import read_gguf
from homering.models.slicing import Role, WindowSpec, slice_window, swa_flags, window_tensor_bytes


def test_middle_window_is_vocabulary_free_and_small(smollm2):
    path = slice_window(smollm2, WindowSpec(10, 20, Role.MIDDLE), progress=False)
    gf = read_gguf(path)
    assert gf.get("llama.block_count") == 10
    assert gf.get("tokenizer.ggml.model") == "none" and gf.get("llama.vocab_size") == 1
    assert "tokenizer.ggml.tokens" not in gf.fields
    names = {t.name for t in gf.tensors}
    assert {f"blk.{i}.attn_q.weight" for i in range(10)} <= names and "blk.10.attn_q.weight" not in names
    embd = next(t for t in gf.tensors if t.name == "token_embd.weight")
    assert embd.dims == (576, 1)
    layers = window_tensor_bytes(smollm2, 10, 20)
    assert os.path.getsize(path) <= 1.05 * layers + 4 * 2**20


def test_blocks_are_renumbered_with_their_bytes(smollm2):
    path = slice_window(smollm2, WindowSpec(20, 30, Role.LAST), progress=False)
    src, win = read_gguf(smollm2), read_gguf(path)
    src_t = {t.name: t for t in src.tensors}
    with open(smollm2, "rb") as a, open(path, "rb") as b:
        for t in win.tensors:
            if not t.name.startswith("blk."):
                continue
            i, rest = t.name.split(".", 2)[1:]
            orig = src_t[f"blk.{int(i) + 20}.{rest}"]
            assert (t.dims, t.ggml_type, t.n_bytes) == (orig.dims, orig.ggml_type, orig.n_bytes)
            a.seek(orig.offset)
            b.seek(t.offset)
            assert a.read(256) == b.read(256)
    assert "tokenizer.ggml.tokens" in win.fields  # the last window samples and detokenizes


def test_first_window_keeps_embedding_and_only_the_vocabulary_size(smollm2):
    """A first window takes token ids but never tokenizes: the embedding, and llama.cpp's ``none`` vocabulary
    of the model's size (every id stays valid; the tokenizer's anonymous memory is not loaded)."""
    import numpy as np

    from homering.engine.window import LayerWindow

    path = slice_window(smollm2, WindowSpec(0, 10, Role.FIRST), progress=False)
    gf = read_gguf(path)
    embd = next(t for t in gf.tensors if t.name == "token_embd.weight")
    assert embd.dims == (576, 49152)
    assert gf.get("tokenizer.ggml.model") == "none" and gf.get("llama.vocab_size") == 49152
    assert "tokenizer.ggml.tokens" not in gf.fields
    with LayerWindow(path, takes_tokens=True, gives_logits=False, n_threads=1) as w:
        assert w.n_vocab == 49152
        out = w.forward(np.array([0, 49151], dtype=np.int32), 0)  # the highest id is valid
        assert out.hidden is not None and out.hidden.shape == (2, 576)


def test_gemma_sliding_window_flags_move_with_the_layers(gemma):
    gf = read_gguf(slice_window(gemma, WindowSpec(5, 11, Role.MIDDLE), progress=False))
    full = swa_flags(6, False, 18)
    assert gf.get("gemma3.attention.sliding_window_pattern") == full[5:11]
    assert gf.get("gemma3.attention.sliding_window_pattern") == [False, True, True, True, True, True]


def test_windows_are_cached(smollm2):
    spec = WindowSpec(3, 9, Role.MIDDLE)
    first = slice_window(smollm2, spec, progress=False)
    stat = first.stat()
    again = slice_window(smollm2, spec, progress=False)
    assert again == first and again.stat().st_mtime_ns == stat.st_mtime_ns
    assert slice_window(smollm2, WindowSpec(0, 30, Role.WHOLE)) == smollm2


def test_qwen2_bias_tensors_move_with_their_blocks(qwen2_small):
    """A qwen2 window keeps its blocks' attn_q/k/v biases (float32), renumbered, with their bytes."""
    path = slice_window(qwen2_small, WindowSpec(4, 6, Role.LAST), progress=False)
    src, win = read_gguf(qwen2_small), read_gguf(path)
    src_t = {t.name: t for t in src.tensors}
    biases = [t for t in win.tensors if t.name.endswith(".bias")]
    assert sorted(t.name for t in biases) == sorted(f"blk.{i}.attn_{x}.bias" for i in (0, 1) for x in "qkv")
    with open(qwen2_small, "rb") as a, open(path, "rb") as b:
        for t in biases:
            i, rest = t.name.split(".", 2)[1:]
            orig = src_t[f"blk.{int(i) + 4}.{rest}"]
            assert (t.dims, t.ggml_type) == (orig.dims, 0)
            a.seek(orig.offset)
            b.seek(t.offset)
            assert a.read(t.n_bytes) == b.read(t.n_bytes)
    assert win.get("qwen2.block_count") == 2


def test_slicing_leaves_neither_the_window_nor_what_it_copied_in_the_page_cache(smollm2, tmp_path):
    """Slicing reads each copied byte once: the model's copied ranges and the window written leave the page cache
    (a 32B model's windows would otherwise fill the memory cgroup of the process that slices them), while the
    rest of the model stays where it was."""
    import shutil

    from homering.engine.pages import resident_pages

    model = tmp_path / "m.gguf"
    shutil.copyfile(smollm2, model)
    with open(model, "rb+") as f:
        os.fsync(f.fileno())  # clean pages, as a downloaded model's (the kernel keeps dirty ones)
    model.read_bytes()  # all of it cached
    assert resident_pages(model).all()
    spec = WindowSpec(3, 9, Role.MIDDLE)
    window = slice_window(model, spec, out=tmp_path / "w.gguf", progress=False)
    after = resident_pages(model)
    gf = read_gguf(model)
    page = os.sysconf("SC_PAGE_SIZE")
    copied = np.zeros_like(after)
    for t in gf.tensors:
        if t.name.startswith(tuple(f"blk.{i}." for i in range(3, 9))):
            copied[t.offset // page : -(-(t.offset + t.n_bytes) // page)] = True  # offsets are absolute
    assert after[copied].mean() < 0.5  # dropped (the kernel reads some back ahead of later copies: ~20%)
    assert after[~copied].mean() > 0.9  # the other layers and the vocabulary stay cached
    assert not resident_pages(window).any()

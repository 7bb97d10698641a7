"""The tokenizer of synthetic models: SmolLM2's, padded to a real model's vocabulary size when asked.

Every ``tokenizer.*`` entry of the registry's ``smollm2`` GGUF is copied
verbatim. A shape with a larger real vocabulary (Qwen2.5's 151936 or 152064
rows) gets extra tokens ``[PAD<id>]`` of type UNUSED, as llama.cpp's
``convert_hf_to_gguf.py`` pads Qwen2 vocabularies to the embedding's row
count, so the token embedding and output head have the real model's rows (and
bytes). Text tokenizes exactly as with SmolLM2: BPE never produces the padding
tokens.
"""

from __future__ import annotations

import struct

import numpy as np

from homering.errors import ModelError
from homering.models import gguf_file as gfile

TOKEN_TYPE_UNUSED = 5  # llama.cpp's LLAMA_TOKEN_TYPE_UNUSED


def _padded(f: gfile.Field, n_have: int, n_vocab: int) -> bytes:
    """The raw entry of per-token array ``f`` with ``n_vocab - n_have`` padding values appended."""
    head = 8 + len(f.key.encode()) + 4 + 4  # key, value type, element type; then the u64 count
    ids = range(n_have, n_vocab)
    if f.sub_type == gfile.STRING:
        extra = b"".join(gfile.encode_string(f"[PAD{i}]") for i in ids)
    elif f.key == "tokenizer.ggml.token_type":
        extra = np.full(len(ids), TOKEN_TYPE_UNUSED, dtype="<i4").tobytes()
    elif f.sub_type == gfile.FLOAT32:  # scores
        extra = np.zeros(len(ids), dtype="<f4").tobytes()
    else:
        raise ModelError(f"cannot pad the tokenizer's per-token array {f.key}")
    return f.raw[:head] + struct.pack("<Q", n_vocab) + f.raw[head + 8 :] + extra


def tokenizer_entries(n_vocab: int | None = None) -> tuple[list[bytes], int]:
    """SmolLM2's encoded ``tokenizer.*`` entries and the vocabulary size they give.

    Args:
        n_vocab: pad the vocabulary to this many tokens (None: SmolLM2's 49152).

    Raises:
        ModelError: SmolLM2 cannot be resolved (it is pulled when missing), has no
            tokens, or ``n_vocab`` is below its vocabulary size.
    """
    from homering.models.gguf_file import read_gguf
    from homering.models.registry import resolve_model

    gf = read_gguf(resolve_model("smollm2", quiet=True))
    tokens = gf.fields.get("tokenizer.ggml.tokens")
    if tokens is None or not tokens.length:
        raise ModelError(f"{gf.path} has no tokenizer.ggml.tokens")
    n_have = int(tokens.length)
    n_vocab = n_have if n_vocab is None else n_vocab
    if n_vocab < n_have:
        raise ModelError(f"a vocabulary of {n_vocab} tokens is smaller than the tokenizer's {n_have}")
    entries = []
    for key, f in gf.fields.items():
        if not key.startswith("tokenizer."):
            continue
        per_token = f.vtype == gfile.ARRAY and f.length == n_have
        entries.append(_padded(f, n_have, n_vocab) if per_token and n_vocab > n_have else f.raw)
    return entries, n_vocab

"""Whether two GGUF models share a vocabulary (a draft model must have its target's)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from homering.models.gguf_file import read_gguf


def vocabulary_digest(path: Path) -> tuple[int, str]:
    """(number of tokens, sha256 of the encoded ``tokenizer.ggml.model`` and ``tokenizer.ggml.tokens``
    entries) of a GGUF file's vocabulary, from its header.

    Raises:
        ModelError: not a readable GGUF file.
    """
    f = read_gguf(path)
    h = hashlib.sha256()
    n_tokens = 0
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        field = f.fields.get(key)
        if field is not None:
            h.update(field.raw[len(key) + 8 :])  # the entry without its key: type and value
            if key.endswith("tokens"):
                n_tokens = field.length or 0
    return n_tokens, h.hexdigest()


def vocabulary_mismatch(target: Path, draft: Path) -> str | None:
    """Why ``draft`` cannot draft for ``target`` (a one-line reason), or None when their vocabularies are
    the same token for token (speculative decoding compares token ids).

    Raises:
        ModelError: either file is not a readable GGUF file.
    """
    (n_t, d_t), (n_d, d_d) = vocabulary_digest(target), vocabulary_digest(draft)
    if n_t != n_d:
        return f"the draft model {draft.name} has {n_d} tokens, the target {target.name} has {n_t}"
    if d_t != d_d:
        return f"the draft model {draft.name} has another vocabulary than the target {target.name}"
    return None

"""The gold standard: greedy decoding of the unsplit model with plain llama-cpp-python."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np

from homering.engine.window import plain_llama


class Reference:
    """The whole model in one ``llama_cpp.Llama``, decoded greedily token by token."""

    def __init__(self, path: Path, n_ctx: int = 2048):
        self.llm = plain_llama(path, n_ctx=n_ctx, n_threads=2, n_batch=512, flash_attn=True, verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=True, special=True)

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def greedy(self, prompt_ids: list[int], n_new: int) -> tuple[list[int], np.ndarray]:
        """``n_new`` greedy tokens (not stopping at end-of-generation) and the logits after the prompt."""
        self.llm.reset()
        self.llm.eval(prompt_ids)
        first = logits = self._last_logits()
        out = []
        for _ in range(n_new):
            tok = int(np.argmax(logits))
            out.append(tok)
            self.llm.eval([tok])
            logits = self._last_logits()
        return out, first

    def _last_logits(self) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).copy()

    def check_answer(self, prompt_ids: list[int], token_ids: list[int], finish_reason: str, n_max: int) -> None:
        """Assert that a cluster's greedy answer equals the reference's.

        The cluster stops before an end-of-generation token; the reference
        does not stop, so its next token must be one.
        """
        ref, _ = self.greedy(prompt_ids, n_max)
        assert token_ids == ref[: len(token_ids)]
        if finish_reason == "stop":
            assert len(token_ids) < n_max and self.is_eog(ref[len(token_ids)])
        else:
            assert len(token_ids) == n_max

    def close(self) -> None:
        self.llm.close()

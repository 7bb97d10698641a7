"""Tokenizer and chat template of a GGUF model, without loading its weights."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Any, cast

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_types import ChatCompletionRequestMessage

from homering.engine.backend import init_backend, token_piece
from homering.engine.grammar import check_grammar
from homering.errors import ModelError
from homering.models.gguf_file import read_gguf

# Used when a GGUF carries no tokenizer.chat_template (Gemma-3-270M's does not).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Tokenizer:
    """A vocabulary-only llama.cpp model: tokenize, detokenize, render chats.

    Args:
        path: a GGUF file that has a tokenizer (a whole model, or a first/last window).

    Raises:
        ModelError: llama.cpp cannot load the vocabulary.
    """

    def __init__(self, path: str | Path) -> None:
        init_backend(False)
        self.path = Path(path)
        gf = read_gguf(self.path)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ModelError(f"llama.cpp could not load the vocabulary of {self.path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        bos, eos = llama_cpp.llama_vocab_bos(self._vocab), llama_cpp.llama_vocab_eos(self._vocab)
        self.bos_text = token_piece(self._vocab, bos, special=True).decode(errors="replace")
        self.eos_text = token_piece(self._vocab, eos, special=True).decode(errors="replace")
        template = gf.get("tokenizer.chat_template")
        if not template:
            template = GEMMA_TEMPLATE if gf.arch.startswith("gemma") else CHATML_TEMPLATE
        self.chat_template = template
        self._formatter = Jinja2ChatFormatter(
            template, eos_token=self.eos_text, bos_token=self.bos_text, add_generation_prompt=True
        )

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """The longest text one token stands for, in bytes: ``len(text) // max_token_bytes`` is a lower bound
        of the tokens of ``text`` (read from the vocabulary on first use: ~1 s for 262k tokens)."""
        return max(1, max(len(token_piece(self._vocab, t, special=False)) for t in range(self.n_vocab)))

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS/EOS as the model asks."""
        raw = text.encode()
        cap = len(raw) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens are not rendered)."""
        cap = 16 * len(ids) + 16
        buf = ctypes.create_string_buffer(cap)
        arr = (llama_cpp.llama_token * len(ids))(*ids)
        n = llama_cpp.llama_detokenize(self._vocab, arr, len(ids), buf, cap, False, False)
        return buf.raw[: max(n, 0)].decode(errors="replace")

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """Render ``[{"role", "content"}, …]`` with the model's chat template, ready for the assistant.

        ``tools`` (OpenAI tool definitions) are passed to the template as Hugging Face templates take them;
        a template that does not use them ignores them.

        Raises:
            ModelError: the template rejects these messages.
        """
        try:
            chat = cast("list[ChatCompletionRequestMessage]", messages)
            return self._formatter(messages=chat, tools=cast(Any, tools)).prompt
        except Exception as exc:  # jinja errors: a template that rejects these messages
            raise ModelError(f"the chat template rejected the messages: {exc}") from None

    def check_grammar(self, gbnf: str) -> None:
        """Parse a GBNF grammar over this vocabulary (:func:`homering.engine.grammar.check_grammar`).

        Raises:
            GrammarError: llama.cpp cannot parse it.
        """
        check_grammar(self._vocab, gbnf)

    def chat_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of the rendered chat (BOS added once, special tokens parsed)."""
        prompt = self.chat_prompt(messages, tools)
        add = not (self.bos_text and prompt.startswith(self.bos_text))
        return self.tokenize(prompt, add_special=add, parse_special=True)

    def close(self) -> None:
        """Free the vocabulary. Idempotent."""
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # pragma: no cover
        try:
            self.close()
        except Exception:
            pass

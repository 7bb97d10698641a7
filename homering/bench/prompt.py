"""The prompt of ``homering bench cluster``: a fixed English text, cut to a number of tokens."""

from __future__ import annotations

from pathlib import Path

from homering.errors import HomeringError

PROMPT_TEXT = (
    "The history of the home computer is a story of machines that grew smaller and cheaper while their "
    "owners found ever more uses for them. In the beginning a computer filled a room and needed a team of "
    "engineers; a few decades later it sat on a desk, and then in a pocket. Each step brought new people "
    "to computing: hobbyists who soldered their own boards, students who wrote their first programs, "
    "families who played games and wrote letters, and finally everyone with a phone. "
)


def prompt_ids(model_path: Path, n: int) -> list[int]:
    """``n`` token ids of a fixed English text (BOS first), with the model's own tokenizer.

    Raises:
        HomeringError: n < 2.
    """
    from homering.engine.tokenizer import Tokenizer

    if n < 2:
        raise HomeringError("--prompt-tokens must be at least 2")
    tok = Tokenizer(model_path)
    try:
        ids = tok.tokenize(PROMPT_TEXT, add_special=True)
        while len(ids) < n:
            ids += tok.tokenize(PROMPT_TEXT, add_special=False)
    finally:
        tok.close()
    return ids[:n]


def prompt_text(model_path: Path, ids: list[int]) -> str:
    """The text of ``ids`` (BOS and other special tokens not rendered), for systems that take a prompt as text:
    tokenized again with BOS added, it gives ``ids`` back unless the cut at the last token merges differently."""
    from homering.engine.tokenizer import Tokenizer

    tok = Tokenizer(model_path)
    try:
        return tok.detokenize(ids)
    finally:
        tok.close()

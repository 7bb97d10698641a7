"""Constrained generation: GBNF grammars (llama.cpp's grammar sampler) and JSON schemas turned into them.

A grammar restricts each sampled token to those that keep the text a prefix of the grammar's language. It is
llama.cpp's own sampler (``llama_sampler_init_grammar``), applied on the head after the sampler chain the way
llama.cpp's ``common_sampler_sample`` does: the chain picks a token, the grammar checks that one token, and only
when the grammar rejects it are the logits filtered through the grammar over the whole vocabulary and the chain
applied again. A model that follows the format costs one token's check per step, not a vocabulary's.

JSON schemas become GBNF through llama-cpp-python's port of llama.cpp's ``json-schema-to-grammar``
(:func:`schema_to_gbnf`); ``response_format: json_object`` is :data:`JSON_OBJECT_GBNF`.
"""

from __future__ import annotations

import ctypes
import json
from typing import Any

import llama_cpp
from llama_cpp import llama_grammar

from homering.errors import HomeringError

ROOT = "root"
"""The start rule of every grammar (llama-server's default)."""

JSON_OBJECT_GBNF = llama_grammar.JSON_GBNF
"""Any JSON object (``response_format: {"type": "json_object"}``): llama.cpp's ``grammars/json.gbnf``."""


class GrammarError(HomeringError, ValueError):
    """A grammar llama.cpp cannot parse, or a JSON schema the converter cannot turn into one."""


def schema_to_gbnf(schema: Any) -> str:
    """The GBNF grammar of the JSON texts that ``schema`` (a JSON Schema, as a dict) accepts.

    Supported: what llama.cpp's ``json_schema_to_grammar`` supports (types, ``properties``/``required``,
    ``items``/``minItems``/``maxItems``, ``enum``, ``const``, ``anyOf``/``oneOf``, local ``$ref``,
    ``minLength``/``maxLength``, ``pattern``, string formats). Numeric bounds (``minimum``…) are not enforced.

    Raises:
        GrammarError: the converter does not understand the schema (the message says where).
    """
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    try:
        return str(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
    except RecursionError:
        raise GrammarError("the JSON schema is nested too deeply") from None
    except Exception as exc:  # the converter asserts and raises KeyError/TypeError on what it cannot handle
        raise GrammarError(f"the JSON schema cannot be turned into a grammar: {exc or type(exc).__name__}") from None


def grammar_sampler(vocab: llama_cpp.llama_vocab_p, gbnf: str) -> llama_cpp.llama_sampler_p:
    """llama.cpp's grammar sampler of ``gbnf`` (start rule :data:`ROOT`) over ``vocab``; free it with
    ``llama_sampler_free``.

    Raises:
        GrammarError: llama.cpp cannot parse the grammar (it logs why on stderr).
    """
    if "\x00" in gbnf:
        raise GrammarError("the grammar contains a NUL character")
    smpl = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), ROOT.encode())
    if not smpl:
        raise GrammarError("llama.cpp could not parse the grammar (GBNF, with a 'root' rule)")
    return smpl  # type: ignore[no-any-return]


def check_grammar(vocab: llama_cpp.llama_vocab_p, gbnf: str) -> None:
    """Parse ``gbnf`` over ``vocab`` and throw it away: a request's grammar is checked before it reaches a head.

    Raises:
        GrammarError: llama.cpp cannot parse it.
    """
    llama_cpp.llama_sampler_free(grammar_sampler(vocab, gbnf))


def allows(grammar: llama_cpp.llama_sampler_p, token: int, logit: float) -> bool:
    """Whether ``grammar`` (a grammar sampler, in its current state) accepts ``token`` next."""
    cell = llama_cpp.llama_token_data(id=token, logit=logit, p=0.0)
    arr = llama_cpp.llama_token_data_array(data=ctypes.pointer(cell), size=1, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(grammar, ctypes.byref(arr))
    return cell.logit != float("-inf")

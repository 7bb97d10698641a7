"""Structured output: the GBNF grammar a request's ``response_format`` or ``grammar`` asks for.

``response_format: {"type": "json_object"}`` is any JSON object (llama.cpp's ``json.gbnf``); ``{"type":
"json_schema", "json_schema": {"schema": …}}`` the JSON texts the schema accepts (llama.cpp's JSON-schema
converter; ``strict`` or not, the schema is always enforced); ``grammar`` (llama-server's extension) a GBNF
grammar as it is. The grammar travels with the request to the head, whose sampler chain enforces it
(:mod:`homering.engine.grammar`); the controller checks that llama.cpp parses it (400 ``grammar`` if not).
"""

from __future__ import annotations

from homering.api.errors import ApiError
from homering.api.formats import ResponseFormat, SchemaFormat
from homering.engine.grammar import JSON_OBJECT_GBNF, GrammarError, schema_to_gbnf

MAX_GRAMMAR_CHARS = 1 << 20
"""The longest grammar a request may carry (characters): a grammar parses on the controller and the head."""


def format_grammar(response_format: ResponseFormat | None, grammar: str | None) -> str | None:
    """The GBNF grammar of a request's ``response_format`` or ``grammar`` field; None for free text.

    Raises:
        ApiError: 400 with ``param`` ``response_format`` (a ``json_schema`` without a schema, or one the
            converter cannot handle) or ``grammar`` (both given, empty, or too long).
    """
    fmt = response_format.type if response_format is not None else "text"
    if grammar is not None:
        if fmt != "text":
            raise ApiError(400, "give either 'grammar' or a JSON 'response_format', not both", param="grammar")
        if not grammar or len(grammar) > MAX_GRAMMAR_CHARS:
            raise ApiError(400, f"grammar: give a GBNF grammar of 1 to {MAX_GRAMMAR_CHARS} characters", param="grammar")
        return grammar
    if fmt == "json_object":
        return JSON_OBJECT_GBNF
    if isinstance(response_format, SchemaFormat):
        try:
            return schema_to_gbnf(response_format.json_schema.schema_)
        except GrammarError as exc:
            raise ApiError(400, f"response_format.json_schema.schema: {exc}", param="response_format") from None
    return None

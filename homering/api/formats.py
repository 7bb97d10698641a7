"""The request fields of structured output and tool calling (OpenAI's shapes), for :mod:`homering.api.schemas`.

``response_format`` (``text``, ``json_object``, ``json_schema``), ``tools`` (functions with JSON-schema
``parameters``), ``tool_choice`` (``none``/``auto``/``required`` or a named function) and the ``tool_calls``
of an assistant message, as OpenAI's chat completions API reference defines them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"
"""OpenAI's rule for a function's name."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class JsonSchemaFormat(_Strict):
    """``response_format.json_schema``: a name, the schema, and ``strict`` (always enforced here)."""

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema", description="{} is any JSON object")
    strict: bool | None = None


class TextFormat(_Strict):
    """``response_format: {"type": "text"}`` (free text) or ``{"type": "json_object"}`` (any JSON object)."""

    type: Literal["text", "json_object"]


class SchemaFormat(_Strict):
    """``response_format: {"type": "json_schema", "json_schema": {…}}``: JSON that the schema accepts."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[TextFormat | SchemaFormat, Field(discriminator="type")]
"""``response_format``: plain text, any JSON object, or JSON that a schema accepts."""


class FunctionDef(_Strict):
    """A tool's function: its name, what it does, and its arguments' JSON schema."""

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDef


class _FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    """``tool_choice: {"type": "function", "function": {"name": …}}``: call exactly this function."""

    type: Literal["function"]
    function: _FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(_Strict):
    """The function of a tool call: its name and its arguments (a JSON text)."""

    name: str
    arguments: str


class ToolCall(_Strict):
    """One of an assistant message's ``tool_calls``."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction

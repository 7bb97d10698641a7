"""The tool-call syntaxes that chat templates teach their models, one :class:`ToolSyntax` object each.

A syntax is found in the template's text (:func:`detect_syntax`, by the markers llama.cpp's
``common/chat.cpp`` looks for) and knows four things: whether a template speaks it, the grammar of an answer
that must call a tool (``tool_choice`` ``required`` or a named function: even a random-weight model then gives
a valid call), how an answer's text is parsed back into calls, and how earlier calls go to the template.

- :data:`HERMES` (Hermes 2/3 Pro, Qwen 2.5/3): ``<tool_call>{"name", "arguments"}</tool_call>`` blocks.
- :data:`LLAMA3` (Llama 3.1/3.2/3.3, whose templates have an ``ipython`` header for tool results): a JSON
  object ``{"name", "parameters"}`` (3.1 also ``"arguments"``), maybe after ``<|python_tag|>``; 3.2 may give
  several, separated by ``;`` or as a list. Its templates render one call per assistant message.
- :data:`MISTRAL` (Mistral 7B v0.3, Nemo, Small): ``[TOOL_CALLS]`` and a JSON list of ``{"name",
  "arguments", "id"}``; the templates want 9-character alphanumeric call ids, so ids are mapped to such.

The head renders text without special tokens, so ``<|python_tag|>`` and ``[TOOL_CALLS]`` (special tokens in
those models' vocabularies) may be missing from an answer: the parsers accept the calls without them.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
import uuid
from abc import ABC, abstractmethod
from typing import Any

from homering.api.formats import ToolDef
from homering.engine.grammar import schema_to_gbnf

MAX_PARALLEL_CALLS = 8
"""The most tool calls one answer may hold (``parallel_tool_calls``)."""

Call = dict[str, Any]
"""OpenAI's tool call: ``{"id", "type": "function", "function": {"name", "arguments": <JSON text>}}``."""


def openai_call(name: str, arguments: Any, call_id: str | None = None) -> Call:
    """An OpenAI tool call of ``name`` with ``arguments`` (an object, or already a JSON text)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    cid = call_id or f"call_{uuid.uuid4().hex[:24]}"
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def _call_schema(tool: ToolDef, args_key: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON schema of one call of ``tool``: its name (a constant) and its arguments under ``args_key``."""
    props: dict[str, Any] = {"name": {"const": tool.function.name}}
    props[args_key] = tool.function.parameters or {"type": "object"}
    props.update(extra or {})
    return {"type": "object", "properties": props, "required": list(props)}


def _decode_all(text: str, sep: str) -> list[Any] | None:
    """The JSON values that fill ``text`` one after another (separated by blanks or a character of ``sep``);
    None if anything else is in it."""
    dec, pos, out = json.JSONDecoder(), 0, list[Any]()
    while True:
        while pos < len(text) and (text[pos].isspace() or (out and text[pos] in sep)):
            pos += 1
        if pos == len(text):
            return out or None
        try:
            value, pos = dec.raw_decode(text, pos)
        except ValueError:
            return None
        out.append(value)


class ToolSyntax(ABC):
    """One template's tool-call syntax (subclasses: one per syntax, a single instance each).

    Attributes:
        name: the syntax's name (``hermes``, ``llama3``, ``mistral``).
        one_call_per_message: the template renders one call per assistant message (earlier turns with
            several calls are split).
    """

    name = ""
    one_call_per_message = False

    @abstractmethod
    def detects(self, chat_template: str) -> bool:
        """Whether ``chat_template`` (its Jinja text) teaches this syntax."""

    @abstractmethod
    def grammar(self, tools: list[ToolDef], parallel: bool) -> str:
        """The GBNF grammar of an answer that calls one of ``tools`` (up to :data:`MAX_PARALLEL_CALLS` calls
        when ``parallel`` and the syntax has room for several).

        Raises:
            GrammarError: a function's ``parameters`` schema the converter cannot handle.
        """

    @abstractmethod
    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[Call]]:
        """An answer as ``(content, calls)``; text that is not in the syntax, or calls a function not in
        ``names``, is content as it is (no calls)."""

    def call_id(self, call_id: str) -> str:
        """The id of an earlier call (or of the ``tool`` message that answers it) as the template takes it."""
        return call_id


class _Hermes(ToolSyntax):
    name = "hermes"
    CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def detects(self, chat_template: str) -> bool:
        return "<tool_call>" in chat_template

    def grammar(self, tools: list[ToolDef], parallel: bool) -> str:
        body = schema_to_gbnf({"anyOf": [_call_schema(t, "arguments") for t in tools]})
        return 'root ::= "<tool_call>\\n" hr-call "\\n</tool_call>"\n' + body.replace("root ::=", "hr-call ::=", 1)

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[Call]]:
        calls = []
        for m in self.CALL.finditer(text):
            try:
                obj = json.loads(m.group(1))
            except ValueError:
                return text, []
            if not isinstance(obj, dict) or obj.get("name") not in names:
                return text, []
            calls.append(openai_call(obj["name"], obj.get("arguments", {})))
        content = self.CALL.sub("", text).strip()
        return (content or None) if calls else text, calls


class _Llama3(ToolSyntax):
    name = "llama3"
    one_call_per_message = True
    PYTHON_TAG = "<|python_tag|>"

    def detects(self, chat_template: str) -> bool:
        return "<|start_header_id|>ipython<|end_header_id|>" in chat_template

    def grammar(self, tools: list[ToolDef], parallel: bool) -> str:
        # one call: the templates render (and 3.1's accepts) a single call per assistant message
        return schema_to_gbnf({"anyOf": [_call_schema(t, "parameters") for t in tools]})

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[Call]]:
        body = text.strip().removeprefix(self.PYTHON_TAG)
        values = _decode_all(body, ";,")
        if values is not None and len(values) == 1 and isinstance(values[0], list):
            values = values[0]  # [{…}, {…}]
        calls = []
        for obj in values or []:
            args = obj.get("parameters", obj.get("arguments")) if isinstance(obj, dict) else None
            if args is None or obj.get("name") not in names or not isinstance(args, (dict, str)):
                return text, []
            calls.append(openai_call(obj["name"], args))
        return (None, calls) if calls else (text, [])


class _Mistral(ToolSyntax):
    name = "mistral"
    MARKER = "[TOOL_CALLS]"
    ID_CHARS = string.ascii_letters + string.digits
    ID = re.compile(r"[A-Za-z0-9]{9}")

    def detects(self, chat_template: str) -> bool:
        return self.MARKER in chat_template

    def grammar(self, tools: list[ToolDef], parallel: bool) -> str:
        id_schema = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
        one = {"anyOf": [_call_schema(t, "arguments", {"id": id_schema}) for t in tools]}
        calls = {"type": "array", "items": one, "minItems": 1, "maxItems": MAX_PARALLEL_CALLS if parallel else 1}
        body = schema_to_gbnf(calls).replace("root ::=", "ms-calls ::=", 1)
        return f'root ::= "{self.MARKER}" ms-calls\n{body}'

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[Call]]:
        at = text.find(self.MARKER)
        before, rest = (text[:at], text[at + len(self.MARKER) :]) if at >= 0 else ("", text)
        rest = rest.lstrip()
        try:
            items, end = json.JSONDecoder().raw_decode(rest)
        except ValueError:
            return text, []
        items = [items] if isinstance(items, dict) else items
        calls = []
        for obj in items if isinstance(items, list) else []:
            if not isinstance(obj, dict) or obj.get("name") not in names:
                return text, []
            cid = obj.get("id")
            cid = cid if isinstance(cid, str) and self.ID.fullmatch(cid) else self.new_id()
            calls.append(openai_call(obj["name"], obj.get("arguments", {}), cid))
        content = (before + rest[end:]).strip()
        return (content or None, calls) if calls else (text, [])

    def new_id(self) -> str:
        """A fresh call id in the templates' form: 9 letters and digits."""
        return "".join(secrets.choice(self.ID_CHARS) for _ in range(9))

    def call_id(self, call_id: str) -> str:
        """A client's id (``call_…``) as 9 letters and digits, the same for a call and its result."""
        if self.ID.fullmatch(call_id):
            return call_id
        return hashlib.sha256(call_id.encode()).hexdigest()[:9]


HERMES: ToolSyntax = _Hermes()
LLAMA3: ToolSyntax = _Llama3()
MISTRAL: ToolSyntax = _Mistral()
SYNTAXES: tuple[ToolSyntax, ...] = (HERMES, LLAMA3, MISTRAL)
"""In llama.cpp's order of detection (``common_chat_templates_apply_jinja``): Hermes' marker first."""


def detect_syntax(chat_template: str) -> ToolSyntax | None:
    """The tool-call syntax ``chat_template`` teaches, or None (then tools go the generic JSON way).

    A template that never mentions ``tools`` renders none of them, so it has no native syntax.
    """
    if "tools" not in chat_template:
        return None
    return next((s for s in SYNTAXES if s.detects(chat_template)), None)

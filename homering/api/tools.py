"""Tool calling (OpenAI's ``tools`` / ``tool_choice``), on any model: how a chat with tools is rendered, which
grammar constrains the answer, and how the answer's text is parsed back into ``tool_calls``.

Two formats, chosen by the model's chat template:

- **native** (the template renders ``tools`` in a syntax of :mod:`homering.api.toolsyntax`: Hermes/Qwen's
  ``<tool_call>`` blocks, Llama 3.x's JSON ``{"name", "parameters"}``, Mistral's ``[TOOL_CALLS]`` list): the
  tools, the assistant's ``tool_calls`` and the ``tool`` messages go to the template as Hugging Face templates
  take them; the answer's calls are parsed back by the syntax. ``required`` and a named function constrain the
  answer to a call in that syntax by a grammar; ``auto`` leaves the text free.
- **generic** (any other template, e.g. SmolLM2's and Gemma 3's): a system message lists the tools and asks
  for a JSON object, ``{"tool_calls": [{"name", "arguments"}, …]}`` or ``{"content": "…"}``; a grammar built
  from the tools' parameter schemas holds the answer to exactly that, so even a 135M model answers a valid call.
  Earlier calls and tool results are rendered in the same JSON.

:func:`plan_chat` does it for an OpenAI-shaped chat request (:class:`~homering.api.schemas.ChatCompletionBody`;
other front doors translate into that shape and call it too), and :meth:`ChatPlan.parse` reads an answer back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from homering.api.errors import ApiError
from homering.api.formats import CalledFunction, ToolDef
from homering.api.schemas import ChatCompletionBody
from homering.api.structured import format_grammar
from homering.api.toolsyntax import MAX_PARALLEL_CALLS, ToolSyntax, detect_syntax, openai_call
from homering.engine.grammar import GrammarError, schema_to_gbnf
from homering.wire import ChatMessage

GENERIC_PROMPT = (
    "You can call these tools (functions):\n{tools}\n"
    'To call tools, answer with only a JSON object: {{"tool_calls": [{{"name": <function name>, '
    '"arguments": {{<its arguments>}}}}]}}.'
)
GENERIC_CONTENT = (
    "\nTo answer the user (also once a tool gave you what they asked), answer with only a JSON object: "
    '{"content": <your answer>}.'
)
GENERIC_RESULT = "The tool {name} returned: {result}"

Mode = Literal["native", "generic"]


def native_tools(chat_template: str) -> bool:
    """Whether a chat template renders tools in a syntax of :mod:`homering.api.toolsyntax`."""
    return detect_syntax(chat_template) is not None


@dataclass
class ChatPlan:
    """A chat request made ready for the cluster: the messages to render, the tools for the template, the
    grammar, and how to read the answer back (:meth:`parse`)."""

    messages: list[ChatMessage]
    tools: list[dict[str, Any]] | None = None
    grammar: str | None = None
    mode: Mode | None = None
    names: set[str] = field(default_factory=set)
    syntax: ToolSyntax | None = None

    def parse(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """An answer's text as ``(content, tool_calls)``; ``tool_calls`` are OpenAI's
        ``[{"id", "type": "function", "function": {"name", "arguments": <JSON text>}}]`` (empty: no call).

        Text that is not in the format (an answer cut by ``max_tokens``, a call to an unknown function) is
        returned as content, as it is.
        """
        if self.mode == "generic":
            return self._parse_generic(text)
        if self.mode == "native" and self.syntax is not None:
            return self.syntax.parse(text, self.names)
        return text, []

    def _parse_generic(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        try:
            obj = json.loads(text)
        except ValueError:
            return text, []
        if isinstance(obj, dict) and isinstance(obj.get("content"), str):
            return obj["content"], []
        calls = obj.get("tool_calls") if isinstance(obj, dict) else None
        if not isinstance(calls, list) or not all(self._known(c) for c in calls):
            return text, []
        return None, [openai_call(c["name"], c.get("arguments", {})) for c in calls]

    def _known(self, obj: Any) -> bool:
        return isinstance(obj, dict) and obj.get("name") in self.names


def _function(fn: CalledFunction) -> dict[str, Any]:
    """A call's function with its ``arguments`` (a JSON text) parsed, as templates render them (text that is no
    JSON stays text)."""
    try:
        args = json.loads(fn.arguments)
    except ValueError:
        args = fn.arguments
    return {"name": fn.name, "arguments": args}


def _choice(body: ChatCompletionBody) -> tuple[str, str | None]:
    """``tool_choice`` as ``(kind, function name)``: kind ``none``/``auto``/``required``/``named``.

    Raises:
        ApiError: 400 ``tool_choice``: it asks for a tool but there are none, or names a function not in ``tools``.
    """
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if isinstance(choice, str):
        if choice != "none" and not tools:
            raise ApiError(400, f"tool_choice: '{choice}' needs 'tools'", param="tool_choice")
        return choice, None
    name = choice.function.name
    if name not in {t.function.name for t in tools}:
        raise ApiError(400, f"tool_choice: the function '{name}' is not in 'tools'", param="tool_choice")
    return "named", name


def _messages(body: ChatCompletionBody, syntax: ToolSyntax | None, names: set[str]) -> list[ChatMessage]:
    """The chat's messages for the template: a native syntax keeps tool calls and results as fields (ids and
    calls per message as the syntax's templates take them), generic (and a chat without tools) writes them as
    JSON text.

    Raises:
        ApiError: 400 ``messages``: a call to a function not in ``tools``.
    """
    calls: dict[str, str] = {}
    out = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        for c in m.tool_calls or []:
            if c.function.name not in names:
                msg = f"messages.{i}.tool_calls: the function '{c.function.name}' is not in 'tools'"
                raise ApiError(400, msg, param="messages")
            calls[c.id] = c.function.name
        if role == "tool":  # a result for no earlier call (the client's history) is rendered all the same
            name = calls.get(m.tool_call_id or "", "a tool")
            if syntax is not None:
                cid = syntax.call_id(m.tool_call_id) if m.tool_call_id else None
                out.append(ChatMessage(role="tool", content=text, tool_call_id=cid, name=name))
            else:
                out.append(ChatMessage(role="user", content=GENERIC_RESULT.format(name=name, result=text)))
        elif m.tool_calls and syntax is not None:
            tc = [
                {"id": syntax.call_id(c.id), "type": "function", "function": _function(c.function)}
                for c in m.tool_calls
            ]
            groups = [[c] for c in tc] if syntax.one_call_per_message else [tc]
            out += [
                ChatMessage(role="assistant", content=text if k == 0 else "", tool_calls=g)
                for k, g in enumerate(groups)
            ]
        elif m.tool_calls:
            generic = [_function(c.function) for c in m.tool_calls]
            out.append(ChatMessage(role="assistant", content=json.dumps({"tool_calls": generic})))
        else:
            out.append(ChatMessage(role=role, content=text))
    return out


def _call_schema(tool: ToolDef) -> dict[str, Any]:
    params = tool.function.parameters or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
    }


def _tool_grammar(
    tools: list[ToolDef], kind: str, name: str | None, syntax: ToolSyntax | None, parallel: bool
) -> str | None:
    """The grammar of an answer: generic, the JSON object of calls (or content, for ``auto``); native, a call
    in the syntax (``required``, named) or free text (``auto``).

    Raises:
        ApiError: 400 ``tools``: a function's ``parameters`` schema the grammar converter cannot handle.
    """
    chosen = [t for t in tools if name is None or t.function.name == name]
    try:
        if syntax is not None:
            return None if kind == "auto" else syntax.grammar(chosen, parallel)
        n_max = MAX_PARALLEL_CALLS if parallel else 1
        one_call: dict[str, Any] = {"anyOf": [_call_schema(t) for t in chosen]}
        calls = {"type": "array", "items": one_call, "minItems": 1, "maxItems": n_max}
        answer: dict[str, Any] = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
        if kind == "auto":
            content = {"type": "object", "properties": {"content": {"type": "string"}}, "required": ["content"]}
            answer = {"anyOf": [answer, content]}
        return schema_to_gbnf(answer)
    except GrammarError as exc:
        raise ApiError(400, f"tools: a function's parameters: {exc}", param="tools") from None


def plan_chat(body: ChatCompletionBody, chat_template: str) -> ChatPlan:
    """Ready an OpenAI-shaped chat request for the cluster: messages, tools, grammar and how to parse the answer.

    Without tools (or with ``tool_choice: "none"``) the grammar is ``response_format``'s or ``grammar``'s
    (:func:`~homering.api.structured.format_grammar`); with tools, the tool format's (see the module).

    Args:
        body: the request (its ``messages``, ``tools``, ``tool_choice``, ``parallel_tool_calls``,
            ``response_format``, ``grammar``).
        chat_template: the model's chat template (decides native or generic tool calls).

    Raises:
        ApiError: 400 with ``param``: ``tool_choice``, ``tools``, ``messages``, ``response_format`` or ``grammar``.
    """
    tools = body.tools or []
    names = {t.function.name for t in tools}
    kind, name = _choice(body)
    syntax = detect_syntax(chat_template)
    messages = _messages(body, syntax, names)
    if kind == "none":
        return ChatPlan(messages, grammar=format_grammar(body.response_format, body.grammar), names=names)
    if syntax is not None:
        as_dicts = [t.model_dump(by_alias=True, exclude_none=True) for t in tools]
        grammar = _tool_grammar(tools, kind, name, syntax, body.parallel_tool_calls)
        return ChatPlan(messages, tools=as_dicts, grammar=grammar, mode="native", names=names, syntax=syntax)
    chosen = [t for t in tools if name is None or t.function.name == name]
    listed = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in chosen)
    prompt = GENERIC_PROMPT.format(tools=listed) + (GENERIC_CONTENT if kind == "auto" else "")
    if messages and messages[0].role == "system":
        messages[0] = ChatMessage(role="system", content=f"{messages[0].content}\n\n{prompt}")
    else:
        messages.insert(0, ChatMessage(role="system", content=prompt))
    grammar = _tool_grammar(tools, kind, name, None, body.parallel_tool_calls)
    return ChatPlan(messages, grammar=grammar, mode="generic", names=names)

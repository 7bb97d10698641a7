"""The translations between the Ollama and Anthropic wire formats and OpenAI's, as pure functions: requests onto
OpenAI's field names (``response_format``, ``tools``, ``tool_choice``, tool messages, assistant ``tool_calls``)
and OpenAI answers and streams (tool calls streamed in parts) back. The end-to-end checks with the official
clients are in tests/test_doors.py (those that need tool calling or grammars wait for issue 21)."""

from __future__ import annotations

import asyncio
import json

import pytest

from homering.api import anthropic_schemas as claude
from homering.api import ollama_schemas as olla
from homering.api.anthropic import _events, _message
from homering.api.bridge import Piece, answer_piece, stream_pieces
from homering.api.errors import ApiError
from homering.api.ollama import _final

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "d", "parameters": SCHEMA}}


def test_ollama_format_options_and_tools_become_openai_fields():
    body = olla.ChatBody.model_validate(
        {
            "model": "smollm2:latest",
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
                },
                {"role": "tool", "content": "18 C", "tool_name": "get_weather"},
            ],
            "tools": [TOOL],
            "format": SCHEMA,
            "options": {"temperature": 0, "num_predict": 8, "stop": ["\n"], "seed": 3, "num_ctx": 4096},
            "keep_alive": "5m",
        }
    )
    out = olla.chat_request(body)
    assert out["model"] == "smollm2" and out["stream"] and out["stream_options"] == {"include_usage": True}
    assert out["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "ollama_format", "schema": SCHEMA, "strict": True},
    }
    assert out["tools"] == [TOOL] and "num_ctx" not in out
    assert {k: out[k] for k in ("temperature", "max_tokens", "stop", "seed")} == {
        "temperature": 0,
        "max_tokens": 8,
        "stop": ["\n"],
        "seed": 3,
    }
    call = out["messages"][1]["tool_calls"][0]
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert out["messages"][2] == {"role": "tool", "content": "18 C", "tool_call_id": call["id"]}
    assert olla.response_format("json") == {"type": "json_object"} and olla.response_format("") is None
    assert "max_tokens" not in olla.sampling_fields(olla.Options(num_predict=-1))  # -1: no limit of its own


def test_ollama_bad_messages_name_the_field():
    lone = olla.ChatBody.model_validate({"model": "m", "messages": [{"role": "tool", "content": "x"}]})
    with pytest.raises(ApiError) as err:
        olla.chat_request(lone)
    assert err.value.status == 400 and err.value.param == "messages.0"
    with pytest.raises(ApiError) as empty:
        olla.chat_request(olla.ChatBody(model="m"))
    assert empty.value.param == "messages"
    raw_path, raw = olla.generate_request(olla.GenerateBody(model="m", prompt="1, 2,", raw=True, stream=False))
    assert raw_path == "/v1/completions" and raw["prompt"] == "1, 2," and "stream_options" not in raw


def test_anthropic_tools_and_tool_blocks_become_openai_fields():
    body = claude.MessagesBody.model_validate(
        {
            "model": "m",
            "max_tokens": 32,
            "system": [{"type": "text", "text": "be brief"}],
            "tools": [{"name": "get_weather", "description": "d", "input_schema": SCHEMA}],
            "tool_choice": {"type": "tool", "name": "get_weather"},
            "stop_sequences": ["END"],
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me look."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "18 C"}],
                        },
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
        }
    )
    out = claude.openai_request(body)
    assert out["tools"] == [TOOL] and out["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert out["stop"] == ["END"] and out["max_tokens"] == 32 and "stream" not in out
    assert out["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18 C"},
        {"role": "user", "content": "thanks"},
    ]
    for choice, expected in (("auto", "auto"), ("any", "required"), ("none", "none")):
        assert (
            claude.openai_request(body.model_copy(update={"tool_choice": claude.ToolChoice(type=choice)}))[
                "tool_choice"
            ]
            == expected
        )


def _stream(chunks):
    async def gen():
        for c in chunks:
            yield c

    async def collect():
        return [p async for p in stream_pieces(gen())]

    return asyncio.run(collect())


CALL_CHUNKS = [
    {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                },
                "finish_reason": None,
            }
        ]
    },
    {
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
                "finish_reason": None,
            }
        ]
    },
    {
        "choices": [
            {
                "index": 0,
                "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
                "finish_reason": None,
            }
        ]
    },
    {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}},
]


def test_streamed_tool_calls_come_back_whole_in_each_format():
    pieces = _stream(CALL_CHUNKS)
    assert len(pieces) == 1
    last = pieces[0]
    assert last.finish == "tool_calls" and last.usage["completion_tokens"] == 7
    assert last.tool_calls == [
        {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    ]
    ollama_final = _final("m", last, 0, None, chat=True)
    assert ollama_final["message"]["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert ollama_final["done_reason"] == "stop" and ollama_final["eval_count"] == 7
    message = _message("msg_1", "m", last)
    assert message["stop_reason"] == "tool_use" and message["content"] == [
        {"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {"city": "Paris"}}
    ]

    async def events():
        async def one():
            yield last

        return [e async for e in _events(one(), "msg_1", "m")]

    sse = asyncio.run(events())
    data = [json.loads(e.split("data: ", 1)[1]) for e in sse]
    assert [d["type"] for d in data] == [
        "message_start",
        "content_block_start",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert data[3]["content_block"] == {"type": "tool_use", "id": "call_9", "name": "get_weather", "input": {}}
    assert (
        json.loads(data[4]["delta"]["partial_json"]) == {"city": "Paris"}
        and data[6]["delta"]["stop_reason"] == "tool_use"
    )


def test_an_error_mid_stream_is_an_error_piece_and_answers_are_pieces():
    pieces = _stream(
        [
            {"choices": [{"index": 0, "delta": {"content": "he"}, "finish_reason": None}]},
            {"error": {"message": "the ring broke"}},
        ]
    )
    assert [p.text for p in pieces] == ["he", ""] and pieces[-1].error == "the ring broke"
    whole = answer_piece(
        {"choices": [{"index": 0, "text": "hi", "finish_reason": "length"}], "usage": {"prompt_tokens": 1}}
    )
    assert whole == Piece(text="hi", finish="length", usage={"prompt_tokens": 1})

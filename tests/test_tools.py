"""Tool calls, structured output, logprobs and n > 1 through the real `openai` SDK against a real cluster
(`homering up`: 2 agents on mosquitto, a real ring), on SmolLM2-135M and Gemma-3-270M."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import httpx
import openai
import pytest

from homering.client.local import stop_processes
from homering.transport.broker import free_port
from tests.conftest import wait_healthy

pytestmark = pytest.mark.slow
jsonschema = pytest.importorskip("jsonschema")

N_CTX = 2048
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}
PERSON = {  # nested: an object in an object, an array of enums, a pattern, bounded strings
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "pets": {"type": "array", "items": {"type": "string", "enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "pets", "member"],
}


def _up(model, mosquitto, log_path):
    port = free_port()
    args = ["up", "--agents", "2", "--model", str(model), "--broker", str(mosquitto), "--threads", "1"]
    args += ["--ctx", str(N_CTX), "--planner", "proportional", "--api-port", str(port), "--no-chat", "--parallel", "4"]
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "homering", *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}", log


@pytest.fixture(scope="module", params=["smollm2", "gemma"])
def served(request, mosquitto, tmp_path_factory):
    """(client, model id, base URL) of a cluster serving SmolLM2-135M or Gemma-3-270M (one at a time: the
    clusters would share the broker's topics)."""
    model = request.getfixturevalue(request.param)
    log_path = tmp_path_factory.mktemp("logs") / "up.log"
    proc, base, log = _up(model, mosquitto, log_path)
    try:
        wait_healthy(base, [proc], log_path=log_path)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
        yield client, client.models.list().data[0].id, base
    finally:
        stop_processes([proc], 30)
        log.close()


def _turns(client, model, *, stream: bool) -> list:
    """call → tool result → answer: each turn's completion (a streamed call assembled by the SDK's stream
    helper, a streamed answer from its deltas)."""
    common = dict(model=model, tools=[WEATHER, TIME], temperature=0)

    def call(messages):  # one call (greedy small models repeat a call up to MAX_PARALLEL_CALLS times)
        if not stream:
            return client.chat.completions.create(
                messages=messages, tool_choice="required", parallel_tool_calls=False, max_tokens=120, **common
            )
        with client.chat.completions.stream(
            messages=messages,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=120,
            stream_options={"include_usage": True},
            **common,
        ) as s:
            return s.get_final_completion()

    def answer(messages) -> tuple[str, str, int]:
        """(content, finish_reason, prompt tokens); the model may ramble: a length finish is an answer too."""
        args = dict(messages=messages, tool_choice="none", max_tokens=48, **common)
        if not stream:
            r = client.chat.completions.create(**args)
            assert not r.choices[0].message.tool_calls
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.prompt_tokens
        text, finish, usage = "", None, None
        for ch in client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
            usage = ch.usage or usage
            for c in ch.choices:
                assert not c.delta.tool_calls
                text, finish = text + (c.delta.content or ""), c.finish_reason or finish
        return text, finish, usage.prompt_tokens

    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    first = call(messages)
    assert first.choices[0].finish_reason == "tool_calls"
    tool_call = first.choices[0].message.tool_calls[0]
    assert tool_call.function.name in ("get_weather", "get_time") and tool_call.id
    json.loads(tool_call.function.arguments)  # a valid JSON object, whatever the model
    messages.append(first.choices[0].message.model_dump(exclude_none=True, exclude={"parsed"}))
    messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": "Sunny, 21 degrees Celsius"})
    text, finish, n_prompt = answer(messages)
    assert text and finish in ("stop", "length")
    _, _, n_alone = answer(messages[:1])
    assert n_prompt > n_alone + 10  # the call and its result were in the prompt
    return [tool_call, text]


def test_three_turn_tool_conversation(served):
    client, model, _ = served
    plain = _turns(client, model, stream=False)
    streamed = _turns(client, model, stream=True)
    p, s = plain[0], streamed[0]
    assert (p.function.name, p.function.arguments) == (s.function.name, s.function.arguments)
    assert plain[1] == streamed[1]


def test_named_tool_choice_calls_that_function(served):
    client, model, _ = served
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
        max_tokens=250,
    )
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message.content
    for call in r.choices[0].message.tool_calls:  # parallel calls allowed: each one of get_time
        assert call.function.name == "get_time" and "zone" in json.loads(call.function.arguments)


def test_json_schema_answers_validate_20_of_20(served):
    """20 answers at temperature 0.7 (5 requests of n = 4): every one parses and validates."""
    client, model, _ = served
    answers = []
    for seed in range(5):
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Invent a person and describe them."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
            temperature=0.7,
            max_tokens=160,
            seed=seed,
            n=4,
        )
        assert len(r.choices) == 4
        answers += [c.message.content for c in r.choices]
    for text in answers:
        jsonschema.validate(json.loads(text), PERSON)


def test_bad_tool_and_format_requests_get_400_with_the_field(served):
    _, model, base = served
    msgs = [{"role": "user", "content": "Hi"}]
    cases = {
        "tool_choice": {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "response_format": {
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "zz"}}}
        },
        "grammar": {"grammar": "root ::= undefined-rule"},
        "messages": {
            "tools": [WEATHER],
            "messages": msgs
            + [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c9", "type": "function", "function": {"name": "rm", "arguments": "{}"}}],
                }
            ],
        },
        "n": {"n": 5},
    }
    for field, extra in cases.items():
        r = httpx.post(f"{base}/v1/chat/completions", json={"model": model, "messages": msgs, **extra}, timeout=60)
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["param"] == field, r.text
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200


def test_grammar_field_and_json_object(served):
    client, model, _ = served
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        temperature=0.8,
        max_tokens=10,
        extra_body={"grammar": 'root ::= ("yes" | "no") "."'},
    )
    assert r.choices[0].message.content in ("yes.", "no.")
    c = client.completions.create(
        model=model,
        prompt="A JSON object:",
        max_tokens=80,
        temperature=0,
        extra_body={"grammar": 'root ::= "[" [0-9]+ "]"'},
    )
    assert c.choices[0].text.startswith("[") and c.choices[0].text[1:-1].isdigit()


def test_logprobs_are_finite_probabilities(served):
    client, model, _ = served
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a color."}],
        temperature=0,
        max_tokens=12,
        logprobs=True,
        top_logprobs=4,
    )
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens and "".join(t.token for t in items) == r.choices[0].message.content
    for t in items:
        assert math.isfinite(t.logprob) and math.exp(t.logprob) <= 1.0
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 4 and tops == sorted(tops, reverse=True)
        assert t.logprob == pytest.approx(tops[0])  # greedy: the chosen token is the most likely one
    c = client.completions.create(model=model, prompt="One, two,", max_tokens=5, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == 5 and all(math.isfinite(x) and x <= 0 for x in lp.token_logprobs)
    assert all(len(d) <= 2 for d in lp.top_logprobs)
    streamed = [
        t
        for ch in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Name a color."}],
            temperature=0,
            max_tokens=12,
            logprobs=True,
            top_logprobs=4,
            stream=True,
        )
        for choice in ch.choices
        if choice.logprobs
        for t in choice.logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in items]


def test_n_choices(served):
    client, model, _ = served
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a word."}],
        n=3,
        temperature=1.0,
        max_tokens=16,
        seed=3,
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) >= 2  # seeds 3, 4, 5: different draws
    greedy = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a word."}], n=3, temperature=0, max_tokens=16
    )
    assert len({c.message.content for c in greedy.choices}) == 1
    texts = {i: "" for i in range(3)}
    for ch in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a word."}],
        n=3,
        temperature=0,
        max_tokens=16,
        stream=True,
    ):
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
    assert set(texts.values()) == {greedy.choices[0].message.content}


def test_responses_api_non_stream_and_stream(served):
    client, model, base = served
    args = dict(model=model, instructions="Answer briefly.", temperature=0, max_output_tokens=24)
    r = client.responses.create(input="Name a color.", **args)
    assert r.status in ("completed", "incomplete") and r.output_text and r.usage.output_tokens > 0
    events = list(
        client.responses.create(
            input=[{"role": "user", "content": "Name a color."}], stream=True, text={"format": {"type": "text"}}, **args
        )
    )
    kinds = [e.type for e in events]
    final = events[-1].response  # response.completed, or response.incomplete (the SDK's helper wants completed)
    assert final.output_text == r.output_text and final.status == r.status
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    person = client.responses.create(
        input="Invent a person.",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}},
        **{**args, "max_output_tokens": 160},
    )
    jsonschema.validate(json.loads(person.output_text), PERSON)
    bad = httpx.post(f"{base}/v1/responses", json={"model": model, "input": "x", "tools": [WEATHER]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools"


def test_langchain_structured_output_and_bind_tools(served):
    """langchain-openai's with_structured_output (each method) and bind_tools give parsed objects."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    client, model, base = served
    llm = langchain_openai.ChatOpenAI(model=model, base_url=f"{base}/v1", api_key="none", temperature=0, max_tokens=120)
    # json_mode's grammar is any JSON object: Gemma-3-270M nests objects until max_tokens (the grammar holds the
    # syntax, not an end), so it runs on SmolLM2 only
    methods = ("json_schema", "function_calling") + (() if "gemma" in model.lower() else ("json_mode",))
    for method in methods:
        hint = " Answer in JSON with a name and an age." if method == "json_mode" else ""
        out = llm.with_structured_output(Person, method=method).invoke("Invent a person." + hint)
        assert isinstance(out, Person), method

    def get_weather(city: str) -> str:
        """The current weather of a city."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="any", parallel_tool_calls=False).invoke(
        "What is the weather in Paris?"
    )
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather" and "city" in msg.tool_calls[0]["args"]

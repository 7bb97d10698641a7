"""The Ollama API and the Anthropic Messages API end to end, through their official Python clients (`ollama`,
`anthropic`), on a real cluster: mosquitto, a controller serving the API with a key, 2 agents on SmolLM2.

One mechanism, two wire formats: a greedy answer through either API is the very answer the `openai` client
gets for the same messages (tests/test_api.py checks that one against the unsplit model), streamed or not.
"""

from __future__ import annotations

import json
import re
import time

import anthropic
import httpx
import ollama
import openai
import pytest

from homering.client.local import LocalCluster
from homering.transport.broker import free_port
from tests.conftest import wait_healthy

KEY = "sk-doors-test-0123456789"
N_CTX = 1024
MAX_NEW = 16
QUESTION = "What is the capital of France?"
SYSTEM = "You are a helpful assistant. Answer in one sentence."
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def base(smollm2, mosquitto, tmp_path_factory):
    """A controller with the API on a free port (key ``KEY``) and 2 agents (the proportional planner: a real
    ring); yields the API's base URL. The children's logs are in the test's ``logs`` folder."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "doors.log"
    with (
        open(log_path, "w") as log,
        LocalCluster(
            smollm2,
            n_agents=2,
            broker=mosquitto,
            threads=1,
            n_ctx=N_CTX,
            planner="proportional",
            controller_args=("--api-port", str(port), "--parallel", "2"),
            controller_env={"HOMERING_API_KEY": KEY},
            log_file=log,
        ) as cluster,
    ):
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, cluster.procs, log_path=log_path)
        yield url


@pytest.fixture(scope="module")
def oai(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(oai) -> str:
    return oai.models.list().data[0].id


@pytest.fixture(scope="module")
def olla(base) -> ollama.Client:
    return ollama.Client(host=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


@pytest.fixture(scope="module")
def claude(base) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base, api_key=KEY, max_retries=0, timeout=120)


# this SDK's messages.create has no sampling parameters (the API still takes temperature, top_p and top_k)
ZERO = {"extra_body": {"temperature": 0}}


def openai_answer(oai, model_id, messages, **kw):
    """The greedy OpenAI chat completion of ``messages``: (text, finish_reason, usage)."""
    resp = oai.chat.completions.create(model=model_id, messages=messages, temperature=0, max_tokens=MAX_NEW, **kw)
    return resp.choices[0].message.content, resp.choices[0].finish_reason, resp.usage


GREEDY = {"temperature": 0, "num_predict": MAX_NEW}
USER = [{"role": "user", "content": QUESTION}]


# ------------------------------------------------------------------ Ollama


def test_ollama_list_show_ps_and_version(olla, model_id, base):
    listed = olla.list().models
    assert [m.model for m in listed] == [model_id]
    assert listed[0].size > 50_000_000 and listed[0].details.format == "gguf"
    assert listed[0].details.family == "llama" and listed[0].details.quantization_level == "Q4_1"
    shown = olla.show(model_id)
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.block_count"] == 30
    assert "completion" in shown.capabilities
    assert olla.show(f"{model_id}:latest").details.family == "llama"  # Ollama's default tag
    running = olla.ps().models
    assert [m.model for m in running] == [model_id] and running[0].context_length == N_CTX
    version = httpx.get(f"{base}/api/version", headers={"Authorization": f"Bearer {KEY}"})
    assert version.status_code == 200 and version.json()["version"]


def test_ollama_chat_is_the_openai_answer_streamed_or_not(olla, oai, model_id):
    text, finish, usage = openai_answer(oai, model_id, USER)
    whole = olla.chat(model=model_id, messages=USER, options=GREEDY, stream=False)
    assert whole.message.role == "assistant" and whole.message.content == text
    assert whole.done and whole.done_reason == ("length" if finish == "length" else "stop")
    assert whole.eval_count == usage.completion_tokens and whole.prompt_eval_count == usage.prompt_tokens
    parts = list(olla.chat(model=model_id, messages=USER, options=GREEDY, stream=True))
    assert len(parts) > 2 and all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content or "" for p in parts) == text
    assert parts[-1].eval_count == usage.completion_tokens and parts[-1].total_duration > 0


def test_ollama_generate_with_system_and_raw(olla, oai, model_id):
    text, _, _ = openai_answer(oai, model_id, [{"role": "system", "content": SYSTEM}, *USER])
    answer = olla.generate(model=model_id, prompt=QUESTION, system=SYSTEM, options=GREEDY)
    assert answer.response == text and answer.done
    streamed = list(olla.generate(model=model_id, prompt=QUESTION, system=SYSTEM, options=GREEDY, stream=True))
    assert "".join(p.response or "" for p in streamed) == text and streamed[-1].done
    prompt = "The capital of France is"
    raw = olla.generate(model=model_id, prompt=prompt, raw=True, options=GREEDY)
    plain = oai.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=MAX_NEW)
    assert raw.response == plain.choices[0].text
    loaded = olla.generate(model=model_id)  # no prompt: Ollama's way to load the model
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_ollama_stop_option_stops_before_the_sequence(olla, oai, model_id):
    text, _, _ = openai_answer(oai, model_id, USER)
    stop = text.split()[2]  # a word from the middle of the greedy answer
    cut = olla.chat(model=model_id, messages=USER, options=GREEDY | {"stop": [stop]}, stream=False)
    assert cut.message.content == text[: text.index(stop)] and cut.done_reason == "stop"


def test_ollama_errors_are_ollamas_with_the_field_named(olla, model_id, base):
    with pytest.raises(ollama.ResponseError) as unknown:
        olla.chat(model="no-such-model", messages=USER, stream=False)
    assert unknown.value.status_code == 404 and "no-such-model" in unknown.value.error
    with pytest.raises(ollama.ResponseError) as hot:
        olla.chat(model=model_id, messages=USER, options={"temperature": 5}, stream=False)
    assert hot.value.status_code == 400 and hot.value.error.startswith("options.temperature")
    with pytest.raises(ollama.ResponseError) as image:
        olla.chat(model=model_id, messages=[{"role": "user", "content": "hi", "images": [b"\x89PNG"]}], stream=False)
    assert image.value.status_code == 400 and "images" in image.value.error
    with pytest.raises(ollama.ResponseError) as keyless:
        ollama.Client(host=base).list()
    assert keyless.value.status_code == 401
    bad = httpx.post(f"{base}/api/chat", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and set(bad.json()) == {"error"}
    assert olla.chat(model=model_id, messages=USER, options=GREEDY, stream=False).done  # still serving


def test_ollama_format_schema_output_validates(olla, model_id):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    options = {"temperature": 0, "num_predict": 128}
    answer = olla.chat(model=model_id, messages=USER, format=schema, options=options)
    data = json.loads(answer.message.content)  # the schema's instance: exactly its two string fields
    assert set(data) == {"city", "country"} and all(isinstance(v, str) for v in data.values()), data
    # format="json" (any JSON object) is response_format json_object (tests/test_doors_translation.py); SmolLM2's
    # free-form JSON rambles past any small num_predict, so only the schema's answer is checked whole here


def test_ollama_tools_a_tool_call_comes_back(olla, model_id):
    messages = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    tools = [{"type": "function", "function": WEATHER_TOOL}]
    options = {"temperature": 0, "num_predict": 128}
    answer = olla.chat(model=model_id, messages=messages, tools=tools, options=options)
    calls = answer.message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and isinstance(calls[0].function.arguments, dict)
    result = {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"}
    followed = olla.chat(model=model_id, messages=[*messages, answer.message, result], tools=tools, options=options)
    assert followed.done and (followed.message.content or followed.message.tool_calls)


def test_ollama_embed(olla, model_id):
    out = olla.embed(model=model_id, input=["The capital of France is Paris.", "Bonjour"])
    assert len(out.embeddings) == 2 and len(out.embeddings[0]) == 576
    assert out.embeddings[0] != out.embeddings[1]


# ------------------------------------------------------------------ Anthropic


def test_anthropic_messages_create_is_the_openai_answer(claude, oai, model_id):
    text, finish, usage = openai_answer(oai, model_id, [{"role": "system", "content": SYSTEM}, *USER])
    msg = claude.messages.create(model=model_id, max_tokens=MAX_NEW, system=SYSTEM, messages=USER, **ZERO)
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == text
    assert msg.stop_reason == ("max_tokens" if finish == "length" else "end_turn")
    assert msg.usage.input_tokens == usage.prompt_tokens and msg.usage.output_tokens == usage.completion_tokens


def test_anthropic_messages_stream_events_in_order(claude, oai, model_id):
    text, _, usage = openai_answer(oai, model_id, USER)
    with claude.messages.stream(model=model_id, max_tokens=MAX_NEW, messages=USER, **ZERO) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and kinds[-2] == "message_delta"
    assert kinds[1] == "content_block_start" and "content_block_stop" in kinds
    assert kinds.count("text") >= 2  # the SDK's event per text delta: streamed, not one block at the end
    assert final.content[0].text == text and final.usage.output_tokens == usage.completion_tokens


def test_anthropic_stop_sequences_and_system_blocks(claude, oai, model_id):
    text, _, _ = openai_answer(oai, model_id, [{"role": "system", "content": SYSTEM}, *USER])
    stop = text.split()[2]
    msg = claude.messages.create(
        model=model_id,
        max_tokens=MAX_NEW,
        system=[{"type": "text", "text": SYSTEM}],
        stop_sequences=[stop],
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        **ZERO,
    )
    assert msg.content[0].text == text[: text.index(stop)] and msg.stop_reason == "end_turn"


def test_anthropic_errors_are_anthropics_with_the_field_named(claude, model_id, base):
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=base, api_key="sk-wrong", max_retries=0).messages.create(
            model=model_id, max_tokens=4, messages=USER
        )
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="no-such-model", max_tokens=4, messages=USER)
    assert unknown.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as hot:
        claude.messages.create(model=model_id, max_tokens=4, messages=USER, extra_body={"temperature": 1.5})
    assert hot.value.body["type"] == "error" and hot.value.body["error"]["message"].startswith("temperature")
    with pytest.raises(anthropic.BadRequestError) as stops:
        claude.messages.create(model=model_id, max_tokens=4, stop_sequences=list("abcde"), messages=USER)
    assert stops.value.body["error"]["message"].startswith("stop_sequences")
    missing = httpx.post(f"{base}/v1/messages", json={"model": model_id, "messages": USER}, headers={"x-api-key": KEY})
    assert missing.status_code == 400 and missing.json()["error"]["message"].startswith("max_tokens")
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as blocks:
        claude.messages.create(model=model_id, max_tokens=4, messages=[{"role": "user", "content": [image]}])
    assert "messages.0.content.0" in blocks.value.body["error"]["message"]


def test_anthropic_tool_use_round_trip(claude, model_id):
    tool = {"name": WEATHER_TOOL["name"], "description": WEATHER_TOOL["description"]}
    tool["input_schema"] = WEATHER_TOOL["parameters"]
    ask = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    first = claude.messages.create(
        model=model_id,
        max_tokens=128,
        tools=[tool],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=ask,
        **ZERO,
    )
    use = next(b for b in first.content if b.type == "tool_use")
    assert first.stop_reason == "tool_use" and use.name == "get_weather" and isinstance(use.input, dict)
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}
    second = claude.messages.create(
        model=model_id,
        max_tokens=128,
        tools=[tool],
        messages=[*ask, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}],
        **ZERO,
    )
    assert second.content and second.stop_reason in ("end_turn", "tool_use")  # the result was taken: an answer


def _cancelled(base) -> float:
    metrics = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    found = re.search(r'^homering_requests_total\{outcome="cancelled"\} ([\d.]+)$', metrics, flags=re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_goes_away_mid_stream_cancels_its_request(base, model_id):
    """Closing an Ollama or an Anthropic stream after its first deltas cancels the request on the cluster (its
    sequence is freed), as on the OpenAI route: the in-process call follows the client."""
    auth = {"Authorization": f"Bearer {KEY}"}
    count = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
    before = _cancelled(base)
    ollama_body = {"model": model_id, "prompt": count, "raw": True, "options": {"temperature": 0, "num_predict": 900}}
    claude_body = {"model": model_id, "max_tokens": 900, "stream": True, "temperature": 0}
    claude_body["messages"] = [{"role": "user", "content": f"Count on to 1000: {count}"}]
    with httpx.Client(timeout=120) as http:
        for url, body, headers in (
            ("/api/generate", ollama_body, auth),
            ("/v1/messages", claude_body, {"x-api-key": KEY}),
        ):
            with http.stream("POST", base + url, json=body, headers=headers) as resp:
                lines = resp.iter_lines()
                firsts = [next(lines) for _ in range(6)]
                assert resp.status_code == 200 and all(firsts[:1]), firsts
        for _ in range(300):
            cluster = http.get(f"{base}/v1/cluster", headers=auth).json()
            if not cluster["requests_in_flight"]:
                break
            time.sleep(0.1)
    assert cluster["requests_in_flight"] == 0
    assert _cancelled(base) - before == 2

"""The template's own tool syntaxes (Hermes/Qwen, Llama 3.x, Mistral): detection on the real templates'
markers, parsing of real-format answers, rendering of a call's history through templates that check what the
real ones check, and end to end through the real `openai` SDK against a real cluster whose model (a copy of
SmolLM2-135M) carries a Llama-3.1-style or a Mistral-style template."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from homering.api.schemas import ChatCompletionBody
from homering.api.tools import plan_chat
from homering.api.toolsyntax import HERMES, LLAMA3, MISTRAL, detect_syntax
from homering.client.local import stop_processes
from homering.engine.sampling import Sampling
from homering.engine.tokenizer import Tokenizer
from homering.models import gguf_file as gfile
from homering.transport.broker import free_port
from tests.conftest import wait_healthy
from tests.test_grammar import _generate
from tests.test_tools import TIME, WEATHER

# Short templates written for these tests: they render tools, calls and results the way Meta's Llama 3.1/3.2
# and Mistral Nemo's templates do, and refuse what those refuse (several calls in one Llama message; call ids
# that are not 9 characters for Mistral).
LLAMA3_LIKE = (
    "{{- bos_token }}<|start_header_id|>system<|end_header_id|>\n\n{% if tools %}Environment: ipython\n{% endif %}"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}{% set messages = messages[1:] %}{% endif %}"
    "<|eot_id|>{% for m in messages %}"
    "{% if m.tool_calls is defined %}{% if m.tool_calls | length != 1 %}{{ raise_exception('one call') }}{% endif %}"
    '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "{{ m.tool_calls[0].function.name }}", '
    '"parameters": {{ m.tool_calls[0].function.arguments | tojson }}}<|eot_id|>'
    "{% elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{% else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{% if loop.first and tools %}"
    'Call a function: answer {"name": function name, "parameters": its arguments}.\n'
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}{{ m.content }}<|eot_id|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_LIKE = (
    "{% set users = messages | selectattr('role', 'equalto', 'user') | list %}{{ bos_token }}"
    "{% for m in messages %}{% if m.role == 'user' %}"
    "{% if tools and m == users[-1] %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST]{{ m.content }}[/INST]{% elif m.tool_calls is defined %}[TOOL_CALLS][{% for c in m.tool_calls %}"
    "{% if c.id | length != 9 %}{{ raise_exception('ids are 9 characters') }}{% endif %}"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}'
    "{% if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}"
    "{% elif m.role == 'tool' %}{% if m.tool_call_id | length != 9 %}{{ raise_exception('ids are 9') }}{% endif %}"
    '[TOOL_RESULTS]{"content": {{ m.content | tojson }}, "call_id": "{{ m.tool_call_id }}"}[/TOOL_RESULTS]'
    "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
NAMES = {"get_weather", "get_time"}


def test_detection_by_the_real_templates_markers():
    """The markers llama.cpp's common/chat.cpp looks for, as they stand in the real templates."""
    qwen = '{%- if tools %}# Tools\n<tools>{{ tool | tojson }}</tools>\n<tool_call>\n{"name": <function-name>}'
    llama32 = (  # Meta's Llama 3.2 template: tools in the first user message, results under an ipython header
        "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
        '{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}'
    )
    llama31 = llama32 + '{{- "<|python_tag|>" + tool_call.name + ".call(" }}'  # 3.1 adds built-in tools
    nemo = '{%- if tools is not none %}{{- "[AVAILABLE_TOOLS][" }}{{- "[TOOL_CALLS][" }}'
    assert detect_syntax(qwen) is HERMES
    assert detect_syntax(llama31) is LLAMA3 and detect_syntax(llama32) is LLAMA3
    assert detect_syntax(nemo) is MISTRAL
    assert detect_syntax("{{ messages }}") is None  # SmolLM2's, Gemma's: the generic JSON format
    assert detect_syntax("[TOOL_CALLS] but no tool definitions") is None
    assert detect_syntax(LLAMA3_LIKE) is LLAMA3 and detect_syntax(MISTRAL_LIKE) is MISTRAL


def _args(call) -> dict:
    return json.loads(call["function"]["arguments"])


def test_llama3_answers_parse_in_every_real_shape():
    one = LLAMA3.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}', NAMES)
    assert one[0] is None and [(c["function"]["name"], _args(c)) for c in one[1]] == [("get_weather", {"city": "Oslo"})]
    tagged = LLAMA3.parse('<|python_tag|>{"name": "get_time", "arguments": {"zone": "CET"}}', NAMES)
    assert _args(tagged[1][0]) == {"zone": "CET"}  # 3.1's python_tag and "arguments"
    typed = LLAMA3.parse('{"type": "function", "name": "get_time", "parameters": {"zone": "UTC"}}', NAMES)
    assert typed[1][0]["function"]["name"] == "get_time"
    several = (
        '{"name": "get_weather", "parameters": {"city": "A;B"}}; {"name": "get_time", "parameters": {"zone": "Z"}}'
    )
    assert [_args(c) for c in LLAMA3.parse(several, NAMES)[1]] == [{"city": "A;B"}, {"zone": "Z"}]  # 3.2's ';'
    listed = '[{"name": "get_weather", "parameters": {"city": "X"}}, {"name": "get_time", "parameters": {}}]'
    assert len(LLAMA3.parse(listed, NAMES)[1]) == 2
    for text in (
        "It is sunny in Oslo.",  # plain content
        '{"name": "get_weather", "parameters": {"city": "Os',  # cut by max_tokens
        '{"name": "rm_rf", "parameters": {}}',  # an unknown function
        '{"answer": 42}',  # JSON, but no call
        '{"name": "get_weather", "parameters": {"city": "X"}} and then some text',
    ):
        assert LLAMA3.parse(text, NAMES) == (text, [])


def test_mistral_answers_parse_with_and_without_the_marker():
    text = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "a1B2c3D4e"}]'
    content, calls = MISTRAL.parse(text, NAMES)
    assert content is None and calls[0]["id"] == "a1B2c3D4e" and _args(calls[0]) == {"city": "Rome"}
    bare = '[{"name": "get_time", "arguments": {"zone": "CET"}}, {"name": "get_weather", "arguments": {}}]'
    calls = MISTRAL.parse(bare, NAMES)[1]  # the special token [TOOL_CALLS] is not rendered by the head
    assert len(calls) == 2 and all(len(c["id"]) == 9 and c["id"].isalnum() for c in calls)
    assert MISTRAL.parse('Let me check. [TOOL_CALLS][{"name": "get_time", "arguments": {}}]', NAMES)[0] == (
        "Let me check."
    )
    for text in ("[1, 2, 3]", "Hello!", '[TOOL_CALLS][{"name": "rm_rf", "arguments": {}}]', '[TOOL_CALLS][{"na'):
        assert MISTRAL.parse(text, NAMES) == (text, [])
    assert MISTRAL.call_id("call_0123456789abcdef") == MISTRAL.call_id("call_0123456789abcdef")
    assert len(MISTRAL.call_id("call_x")) == 9 and MISTRAL.call_id("a1B2c3D4e") == "a1B2c3D4e"


def _history(content_calls: list[dict]) -> ChatCompletionBody:
    msgs = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": content_calls},
        *({"role": "tool", "tool_call_id": c["id"], "content": f"result {i}"} for i, c in enumerate(content_calls)),
    ]
    return ChatCompletionBody.model_validate({"model": "m", "messages": msgs, "tools": [WEATHER, TIME]})


@pytest.fixture(scope="module")
def vocab(smollm2):
    t = Tokenizer(smollm2)
    yield t
    t.close()


def test_history_renders_through_templates_that_check_it(vocab):
    """Two parallel calls with OpenAI-style ids: Llama's template gets one call per message, Mistral's 9-character
    ids, the same for a call and its result; the grammar of ``required`` parses over a real vocabulary."""
    calls = [
        {
            "id": "call_abc123",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "call_def456", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
    ]
    for template, syntax in ((LLAMA3_LIKE, LLAMA3), (MISTRAL_LIKE, MISTRAL)):
        render = Jinja2ChatFormatter(template, eos_token=vocab.eos_text, bos_token=vocab.bos_text)
        plan = plan_chat(_history(calls), template)
        assert plan.syntax is syntax and plan.grammar is None  # auto: free text, parsed
        prompt = render(messages=[m.model_dump(exclude_none=True) for m in plan.messages], tools=plan.tools).prompt
        assert prompt.count("get_weather") == 2 and "result 1" in prompt  # listed, called; the results
        required = plan_chat(_history(calls).model_copy(update={"tool_choice": "required"}), template)
        assert required.grammar
        vocab.check_grammar(required.grammar)
    mid = MISTRAL.call_id("call_abc123")
    assert f'"id": "{mid}"' in prompt and f'"call_id": "{mid}"' in prompt


def test_required_grammars_give_valid_calls_from_noise(vocab):
    """Noise logits (the worst model) under each syntax's ``required`` grammar: the answer parses as a call."""
    city = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Rome"]}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}}]  # no free text:
    # noise would not end a string
    body = ChatCompletionBody.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "Hi"}],
            "tools": tools,
            "tool_choice": "required",
            "parallel_tool_calls": False,
        }
    )
    for template in ("{% if tools %}<tool_call>{% endif %}", LLAMA3_LIKE, MISTRAL_LIKE):
        plan = plan_chat(body, template)
        for seed in range(3):
            text = _generate(vocab, plan.grammar, Sampling(temperature=0.8, seed=seed), seed, n=120)
            content, calls = plan.parse(text)
            assert content is None and [c["function"]["name"] for c in calls] == ["get_weather"], (template, text)
            assert _args(calls[0])["city"] in ("Oslo", "Rome")


def _with_template(src, dst, template: str):
    """A copy of the GGUF ``src`` whose ``tokenizer.chat_template`` is ``template``."""
    gf = gfile.read_gguf(src)
    entries = [f.raw for k, f in gf.fields.items() if k != "tokenizer.chat_template"]
    entries.append(gfile.encode_field("tokenizer.chat_template", gfile.STRING, template))
    tensors = [gfile.TensorSource(t.name, t.dims, t.ggml_type, t.n_bytes, src, t.offset) for t in gf.tensors]
    with open(dst, "wb") as fh:
        gfile.write_gguf(fh, entries, tensors, gf.alignment)
    return dst


@pytest.fixture(scope="module", params=["llama3", "mistral"])
def syntax_served(request, smollm2, mosquitto, tmp_path_factory):
    """(client, model id) of a 2-agent cluster serving SmolLM2-135M under a Llama- or Mistral-style template."""
    folder = tmp_path_factory.mktemp(request.param)
    template = LLAMA3_LIKE if request.param == "llama3" else MISTRAL_LIKE
    model = _with_template(smollm2, folder / f"smollm2-{request.param}.gguf", template)
    port = free_port()
    args = ["up", "--agents", "2", "--model", str(model), "--broker", str(mosquitto), "--threads", "1", "--ctx", "2048"]
    args += ["--planner", "proportional", "--api-port", str(port), "--no-chat", "--parallel", "2"]
    log_path = folder / "up.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "homering", *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        try:
            wait_healthy(f"http://127.0.0.1:{port}", [proc], log_path=log_path)
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
            yield client, client.models.list().data[0].id, request.param
        finally:
            stop_processes([proc], 30)


def _complete(client, stream: bool, **args) -> tuple:
    """(content or None, tool calls, finish_reason, prompt tokens) of a chat completion; streamed, assembled from
    its deltas."""
    if not stream:
        r = client.chat.completions.create(**args)
        c = r.choices[0]
        calls = [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls or []]
        return c.message.content or None, calls, c.finish_reason, r.usage.prompt_tokens
    text, got, finish, prompt = "", {}, None, None
    for ch in client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}):
        prompt = ch.usage.prompt_tokens if ch.usage else prompt
        for c in ch.choices:
            text, finish = text + (c.delta.content or ""), c.finish_reason or finish
            for t in c.delta.tool_calls or []:
                call = got.setdefault(t.index, [t.id, t.function.name, ""])
                call[2] += t.function.arguments or ""
    return text or None, [tuple(v) for _, v in sorted(got.items())], finish, prompt


@pytest.mark.slow
def test_three_turns_in_the_templates_syntax(syntax_served):
    """call (``required``) → tool result → answer (``auto``, then ``none``), non-streamed and streamed alike."""
    client, model, name = syntax_served
    common = dict(model=model, tools=[WEATHER, TIME], temperature=0, parallel_tool_calls=False)
    messages = [{"role": "user", "content": "What is the weather in Paris right now?"}]
    turns = {}
    for stream in (False, True):
        content, calls, finish, _ = _complete(
            client, stream, messages=messages, tool_choice="required", max_tokens=60, **common
        )
        assert finish == "tool_calls" and len(calls) == 1, (content, calls)
        cid, fn, arguments = calls[0]
        assert fn in NAMES and isinstance(json.loads(arguments), dict) and cid
        if name == "mistral":
            assert len(cid) == 9 and cid.isalnum()  # the grammar's id, as the model wrote it
        turns[stream] = [(fn, arguments)]
        history = messages + [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": cid, "type": "function", "function": {"name": fn, "arguments": arguments}}],
            },
            {"role": "tool", "tool_call_id": cid, "content": "Sunny, 21 degrees Celsius"},
        ]
        for choice in ("auto", "none"):
            n_alone = _complete(client, stream, messages=messages, tool_choice=choice, max_tokens=1, **common)[3]
            content, calls, finish, n_prompt = _complete(
                client, stream, messages=history, tool_choice=choice, max_tokens=24, **common
            )
            assert finish == ("tool_calls" if calls else finish) and finish in ("stop", "length", "tool_calls")
            assert choice == "auto" or not calls
            assert n_prompt > n_alone + 10  # the call and its result were rendered into the prompt
            for _, fn, arguments in calls:  # a call in auto is a valid call
                assert fn in NAMES and isinstance(json.loads(arguments), dict)
            turns[stream].append((content, [c[1:] for c in calls], finish))
    assert turns[False] == turns[True]


@pytest.mark.slow
def test_named_tool_choice_in_the_templates_syntax(syntax_served):
    client, model, _ = syntax_served
    named = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        content, calls, finish, _ = _complete(
            client,
            stream,
            model=model,
            messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
            tools=[WEATHER, TIME],
            tool_choice=named,
            temperature=0.8,
            seed=int(stream),
            max_tokens=256,  # room for a sampled argument string: the grammar bounds its form, not its length
        )
        assert finish == "tool_calls" and content is None, content
        assert [c[1] for c in calls] == ["get_time"] * len(calls) and "zone" in json.loads(calls[0][2])

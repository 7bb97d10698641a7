"""Constrained generation and tool formats without a cluster: llama.cpp's grammar sampler over a real
vocabulary, the JSON-schema converter, and the tool-call parsers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from homering.api.errors import ApiError
from homering.api.schemas import ChatCompletionBody
from homering.api.tools import ChatPlan, native_tools, plan_chat
from homering.engine.grammar import GrammarError, grammar_sampler, schema_to_gbnf
from homering.engine.logprobs import log_softmax, token_logprobs
from homering.engine.sampling import SamplerChain, Sampling
from homering.engine.tokenizer import Tokenizer

QWEN_LIKE_TEMPLATE = (  # the tool part of Qwen2.5's template, enough for native_tools and rendering
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    'For each call return <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n{%- endif %}'
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def vocab(smollm2):
    t = Tokenizer(smollm2)
    yield t
    t.close()


def _generate(tok: Tokenizer, gbnf: str, sampling: Sampling, seed: int, n: int = 40) -> str:
    """Sample up to ``n`` tokens from random logits under ``gbnf``; the text until end-of-generation."""
    rng = np.random.default_rng(seed)
    chain = SamplerChain(sampling, tok.n_vocab, grammar=grammar_sampler(tok._vocab, gbnf))
    ids = []
    try:
        for _ in range(n):
            t = chain.sample(rng.normal(0, 3, tok.n_vocab).astype(np.float32))
            if t == 2 or tok.detokenize([t]) == "":  # SmolLM2's <|im_end|> (its end of generation)
                break
            ids.append(t)
    finally:
        chain.close()
    return tok.detokenize(ids)


def test_random_logits_under_a_grammar_give_its_language(vocab):
    """Noise logits (the worst model) still give only words of the grammar, greedy and sampled."""
    for seed in range(5):
        assert _generate(vocab, 'root ::= ("yes" | "no") "!"', Sampling(temperature=0), seed) in ("yes!", "no!")
        assert _generate(vocab, 'root ::= ("yes" | "no") "!"', Sampling(seed=seed), seed) in ("yes!", "no!")


def test_a_nested_schema_grammar_gives_valid_json_from_noise(vocab):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "where": {
                "type": "object",
                "properties": {"zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
                "required": ["zip"],
            },
        },
        "required": ["ok", "where"],
    }
    text = _generate(vocab, schema_to_gbnf(schema), Sampling(temperature=0.7, seed=1), 1, n=200)
    jsonschema.validate(json.loads(text), schema)


def test_bad_grammars_and_schemas_are_refused(vocab):
    with pytest.raises(GrammarError):
        vocab.check_grammar("root ::= undefined-rule")
    with pytest.raises(GrammarError):
        schema_to_gbnf({"type": "no-such-type"})
    vocab.check_grammar('root ::= "a"+')


def test_logprobs_are_a_distribution():
    logits = np.random.default_rng(0).normal(0, 5, 1000).astype(np.float32)
    lp = log_softmax(logits)
    assert np.all(lp <= 0) and np.all(np.isfinite(lp))
    assert np.exp(lp).sum() == pytest.approx(1.0, abs=1e-9)
    one = token_logprobs(logits, 7, 5, lambda t: str(t).encode())
    assert one["logprob"] == pytest.approx(lp[7])
    assert [a["token_id"] for a in one["top"]] == list(np.argsort(-lp)[:5])


def _body(**kw) -> ChatCompletionBody:
    return ChatCompletionBody.model_validate({"model": "m", "messages": [{"role": "user", "content": "Hi"}], **kw})


def test_generic_plan_parses_calls_and_content_and_keeps_anything_else_as_text():
    plan = plan_chat(_body(tools=[WEATHER]), "{{ messages }}")
    assert plan.mode == "generic" and plan.grammar and plan.messages[0].role == "system"
    content, calls = plan.parse('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert plan.parse('{"content": "hello"}') == ("hello", [])
    assert plan.parse('{"tool_calls": [{"name": "rm_rf", "arguments": {}}]}')[1] == []  # an unknown function
    assert plan.parse('{"content": "cut by max_tok') == ('{"content": "cut by max_tok', [])


def test_hermes_plan_renders_tools_and_parses_tool_call_blocks(vocab):
    assert native_tools(QWEN_LIKE_TEMPLATE) and not native_tools(vocab.chat_template)
    plan = plan_chat(_body(tools=[WEATHER], tool_choice="required"), QWEN_LIKE_TEMPLATE)
    assert plan.mode == "native" and plan.tools and plan.grammar and plan.grammar.startswith('root ::= "<tool_call>')
    vocab.check_grammar(plan.grammar)
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = plan.parse(text)
    assert content == "Sure." and calls[0]["function"]["name"] == "get_weather"
    assert plan_chat(_body(tools=[WEATHER]), QWEN_LIKE_TEMPLATE).grammar is None  # auto: free text, parsed


def test_tool_request_errors_name_the_field():
    def param(**kw) -> str | None:
        with pytest.raises(ApiError) as e:
            plan_chat(_body(**kw), "")
        assert e.value.status == 400
        return e.value.param

    assert param(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}) == "tool_choice"
    assert param(tool_choice="required") == "tool_choice"
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}
    assert param(tools=[bad], tool_choice="required") == "tools"
    assert param(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "zz"}}}) == (
        "response_format"
    )
    assert param(grammar='root ::= "a"', response_format={"type": "json_object"}) == "grammar"
    unknown = {"id": "c1", "type": "function", "function": {"name": "rm_rf", "arguments": "{}"}}
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [unknown]}]
    with pytest.raises(ApiError) as e:
        plan_chat(ChatCompletionBody.model_validate({"model": "m", "messages": history, "tools": [WEATHER]}), "")
    assert e.value.param == "messages"
    orphan = [{"role": "user", "content": "Hi"}, {"role": "tool", "tool_call_id": "c1", "content": "x"}]
    plain = plan_chat(ChatCompletionBody.model_validate({"model": "m", "messages": orphan, "tools": [WEATHER]}), "")
    assert "returned: x" in plain.messages[-1].content  # a result for no call (the client's history) is kept
    assert isinstance(plan_chat(_body(), ""), ChatPlan)

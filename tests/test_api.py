"""The OpenAI-compatible API end to end: `homering up --agents 2 --api-port P --no-chat` on a real mosquitto,
driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from homering.client.local import stop_processes
from homering.engine.tokenizer import Tokenizer
from homering.transport.broker import free_port
from tests.conftest import wait_healthy

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Name a color.",
]
N_CTX = 1024
MAX_NEW = 24


@pytest.fixture(scope="module")
def api(smollm2, mosquitto, tmp_path_factory):
    """`homering up` with 2 agents over mosquitto (a real ring: the proportional planner), 4 sequences and a
    queue of 1, Home Assistant discovery on; yields the API's base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("logs") / "up.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "homering",
                "up",
                "--agents",
                "2",
                "--model",
                str(smollm2),
                "--broker",
                str(mosquitto),
                "--threads",
                "1",
                "--ctx",
                str(N_CTX),
                "--planner",
                "proportional",
                "--api-port",
                str(port),
                "--no-chat",
                "--parallel",
                "4",
                "--queue",
                "1",
                "--ha-discovery",
            ],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base, [proc], log_path=log_path)
            yield base
        finally:
            stop_processes([proc], 30)


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    t = Tokenizer(smollm2)
    yield t
    t.close()


def chat(client, model_id, text, **kw):
    return client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=MAX_NEW, **kw
    )


def stream_text(client, model_id, text, **kw) -> tuple[str, str, dict | None]:
    """(text, finish_reason, usage) of a streamed greedy chat completion."""
    out, finish, usage = "", None, None
    for chunk in chat(client, model_id, text, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for c in chunk.choices:
            out += c.delta.content or ""
            finish = c.finish_reason or finish
    return out, finish, usage


def test_models_lists_the_served_model(client, smollm2):
    models = client.models.list().data
    assert [m.id for m in models] == [smollm2.name.removesuffix(".gguf")]


def test_chat_completion_equals_head_greedy_output(client, model_id, smollm2_ref, tokenizer):
    resp = chat(client, model_id, PROMPTS[0])
    choice = resp.choices[0]
    prompt_ids = tokenizer.chat_tokens([{"role": "user", "content": PROMPTS[0]}])
    ref, _ = smollm2_ref.greedy(prompt_ids, MAX_NEW)
    n = resp.usage.completion_tokens
    assert 0 < n <= MAX_NEW
    if choice.finish_reason == "length":
        assert n == MAX_NEW
    else:
        assert choice.finish_reason == "stop" and smollm2_ref.is_eog(ref[n])
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.detokenize(ref[:n])
    assert resp.usage.prompt_tokens == len(prompt_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_equals_non_streaming(client, model_id):
    whole = chat(client, model_id, PROMPTS[1])
    text, finish, usage = stream_text(client, model_id, PROMPTS[1])
    assert text == whole.choices[0].message.content and text
    assert finish == whole.choices[0].finish_reason
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [usage[k] for k in counts] == [getattr(whole.usage, k) for k in counts]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_completions_endpoint_and_stop(client, model_id, smollm2_ref, tokenizer):
    prompt = "The three primary colors are"
    resp = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=16)
    ids = tokenizer.tokenize(prompt, add_special=True, parse_special=True)
    ref, _ = smollm2_ref.greedy(ids, 16)
    n = resp.usage.completion_tokens
    assert resp.choices[0].text == tokenizer.detokenize(ref[:n])
    assert resp.usage.prompt_tokens == len(ids)
    # a stop string cuts the text before it, and the answer ends there with finish_reason "stop"
    full = resp.choices[0].text
    stop = full.strip().split()[1]
    cut = client.completions.create(model=model_id, prompt=prompt, temperature=0, max_tokens=16, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client, model_id):
    kw = dict(temperature=0.9, top_p=0.9, seed=1234)
    a = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=16, **kw
    )
    b = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": PROMPTS[3]}], max_tokens=16, **kw
    )
    assert a.choices[0].message.content == b.choices[0].message.content


def test_four_concurrent_streams_equal_sequential_answers(client, model_id):
    sequential = [stream_text(client, model_id, p)[0] for p in PROMPTS]
    results: list = [None] * len(PROMPTS)

    def worker(i):
        results[i] = stream_text(client, model_id, PROMPTS[i])[0]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == sequential
    assert all(results)


# ------------------------------------------------------------------ errors
def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["type"]
    return err


def test_bad_requests_get_400_and_the_server_lives(api, model_id):
    url = f"{api}/v1/chat/completions"
    _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    _error(httpx.post(url, json={"model": model_id}), 400)  # no messages
    err = _error(
        httpx.post(url, json={"model": model_id, "messages": [{"role": "user", "content": "x"}], "temperature": 7}), 400
    )
    assert err["param"] == "temperature"
    _error(httpx.post(url, json={"model": model_id, "messages": [{"role": "wizard", "content": "x"}]}), 400)
    # n > 1 is served (tests/test_tools.py); more choices than the 4 sequences is a 400 naming n
    err = _error(httpx.post(url, json={"model": model_id, "messages": [{"role": "user", "content": "x"}], "n": 5}), 400)
    assert err["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        openai.OpenAI(base_url=f"{api}/v1", api_key="x", max_retries=0).chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "x"}], max_tokens=0
        )
    assert httpx.get(f"{api}/health").status_code == 200


def test_requests_that_wedged_the_server_get_answers_or_400s_and_it_serves_on(api, model_id, client):
    """Penalties answer; lone surrogates, loose types and huge max_tokens get a 400 naming the field; then
    a normal request answers, no sequence is held and /health is ok."""
    url = f"{api}/v1/chat/completions"
    hi = [{"role": "user", "content": "Say hello."}]
    for penalty in ("presence_penalty", "frequency_penalty"):
        r = httpx.post(url, json={"model": model_id, "messages": hi, "max_tokens": 8, penalty: 0.5}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    bad = [
        ({"model": model_id, "messages": hi, "stop": ["\ud800"]}, "stop"),
        ({"model": model_id, "messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),
        ({"model": "m\ud800", "messages": hi}, "model"),
        ({"model": model_id, "messages": hi, "max_tokens": 2_000_000}, "max_tokens"),
        ({"model": model_id, "messages": hi, "max_tokens": N_CTX + 1}, "max_tokens"),
        ({"model": model_id, "messages": hi, "max_tokens": "5"}, "max_tokens"),
        ({"model": model_id, "messages": hi, "max_tokens": True}, "max_tokens"),
        ({"model": model_id, "messages": hi, "stream": "yes"}, "stream"),
    ]

    def post(u, body):  # ASCII JSON: a lone surrogate travels as the escape \ud800, as a hostile client sends it
        return httpx.post(u, content=json.dumps(body), headers={"content-type": "application/json"})

    for body, field in bad:
        assert _error(post(url, body), 400)["param"] == field, body
    r = post(f"{api}/v1/completions", {"model": model_id, "prompt": "x\udfff"})
    assert _error(r, 400)["param"] == "prompt"
    sequential = chat(client, model_id, PROMPTS[0]).choices[0].message.content
    assert sequential.strip()
    cluster = httpx.get(f"{api}/v1/cluster").json()
    assert cluster["requests_in_flight"] == 0 and cluster["queue_depth"] == 0
    health = httpx.get(f"{api}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_unknown_model_gets_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-5", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found"


def test_the_model_answers_to_its_aliases(api, client, model_id, smollm2):
    """The registry's short name, the file name and the GGUF's general.name serve the same model (the same
    greedy answer, the API id in the answer), are listed in /v1/models and the document's enum."""
    from homering.models.gguf_file import read_gguf

    general = read_gguf(smollm2).get("general.name")
    aliases = {"smollm2", smollm2.name, general}
    card = httpx.get(f"{api}/v1/models").json()["data"][0]
    assert card["id"] == model_id and aliases <= set(card["aliases"]) and model_id not in card["aliases"]
    enum = httpx.get(f"{api}/openapi.json").json()["components"]["schemas"]["ChatCompletionBody"]["properties"]
    assert aliases | {model_id} <= set(enum["model"]["enum"])
    want = chat(client, model_id, PROMPTS[3]).choices[0].message.content
    for alias in sorted(aliases):
        resp = chat(client, alias, PROMPTS[3])
        assert resp.model == model_id and resp.choices[0].message.content == want, alias
        assert client.models.retrieve(alias).id == model_id
    for wrong in ("SMOLLM2", "smollm", f"{model_id}.bin"):
        with pytest.raises(openai.NotFoundError) as info:
            chat(client, wrong, PROMPTS[3])
        assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_context_overflow_gets_413(api, model_id):
    err = _error(httpx.post(f"{api}/v1/completions", json={"model": model_id, "prompt": "word " * (2 * N_CTX)}), 413)
    assert err["code"] == "context_length_exceeded"


async def _hold_sequences(http: httpx.AsyncClient, url: str, body: dict, n: int) -> list:
    """Start ``n`` streaming requests and return once each is generating (so holds a KV sequence):
    ``[(stream context, line iterator)]``; close them with ``await cm.__aexit__(None, None, None)``."""
    streams = []
    for _ in range(n):
        cm = http.stream("POST", url, json=body)
        resp = await cm.__aenter__()
        lines = resp.aiter_lines()
        while not (await lines.__anext__()).startswith("data: {"):
            pass
        streams.append((cm, lines))  # keep the line iterator alive: collecting it closes the response
    return streams


def test_full_queue_gets_429_and_a_dropped_client_frees_its_sequence(api, model_id):
    """4 sequences busy + 1 waiting (the queue holds 1): the next request is refused. Closing the
    streams frees their sequences at once: the cluster is idle again long before they could have finished."""
    body = {
        "model": model_id,
        "prompt": "Once upon a time",
        "max_tokens": N_CTX,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    url = f"{api}/v1/completions"

    async def go():
        async with httpx.AsyncClient(timeout=120) as http:
            streams = await _hold_sequences(http, url, body, 4)
            waiting = asyncio.create_task(http.post(url, json=body | {"stream": False, "max_tokens": 4}))
            for _ in range(100):
                cluster = (await http.get(f"{api}/v1/cluster")).json()
                if cluster["queue_depth"] == 1:
                    break
                await asyncio.sleep(0.05)
            assert cluster["requests_in_flight"] == 4 and cluster["queue_depth"] == 1
            refused = await http.post(url, json=body | {"stream": False})
            for cm, _ in streams:  # the clients go away mid-answer
                await cm.__aexit__(None, None, None)
            waited = await waiting  # served once a sequence was freed
            t0 = time.monotonic()
            while (await http.get(f"{api}/v1/cluster")).json()["requests_in_flight"] and time.monotonic() - t0 < 30:
                await asyncio.sleep(0.1)
            cluster = (await http.get(f"{api}/v1/cluster")).json()
            return refused, waited, cluster, (await http.get(f"{api}/metrics")).text

    refused, waited, cluster, metrics = asyncio.run(go())
    assert _error(refused, 429)["code"] == "queue_full"
    assert waited.status_code == 200 and waited.json()["usage"]["completion_tokens"] >= 1
    assert cluster["requests_in_flight"] == 0 and cluster["queue_depth"] == 0
    cancelled = _sample(metrics, "homering_requests_total", outcome="cancelled")
    assert cancelled == 4


def test_no_plan_gets_503(smollm2, mosquitto, tmp_path):
    """A controller whose agents never came: requests get 503 and /health says it is not ready."""
    port, broker_port = free_port(), free_port()
    with open(tmp_path / "controller.log", "w") as log:  # its own broker: not the module cluster's
        broker = subprocess.Popen(
            [sys.executable, "-m", "homering", "broker", "--port", str(broker_port)], stdout=log, stderr=log
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "homering",
                "controller",
                "--broker",
                f"mqtt://127.0.0.1:{broker_port}",
                "--model",
                str(smollm2),
                "--api-port",
                str(port),
                "--timeout",
                "600",
            ],
            stdout=log,
            stderr=log,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{base}/health", timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("the controller's API did not come up")
                time.sleep(0.3)
        assert health.status_code == 503
        assert health.json()["status"] == "degraded" and "no plan" in health.json()["reason"]
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        _error(
            httpx.post(
                f"{base}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]}
            ),
            503,
        )
    finally:
        stop_processes([proc, broker], 10)


def test_health_degrades_while_no_sequence_frees_for_longer_than_a_request_takes(api, model_id):
    """4 sequences busy with long streams: once none has been free for longer than a request is predicted to
    take, /health answers 503 "degraded" saying why; when the clients leave, it is "ok" again."""
    body = {
        "model": model_id,
        "prompt": "Once upon a time",
        "max_tokens": N_CTX,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    url = f"{api}/v1/completions"

    async def go():
        async with httpx.AsyncClient(timeout=120) as http:
            before = await http.get(f"{api}/health")
            streams = await _hold_sequences(http, url, body, 4)
            predicted = before.json()["predicted_request_s"]
            deadline = time.monotonic() + 3 * (predicted or 0) + 60  # a hang guard, not a timing assertion
            while (busy := await http.get(f"{api}/health")).status_code == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            for cm, _ in streams:  # the clients go away mid-answer: their sequences free
                await cm.__aexit__(None, None, None)
            deadline = time.monotonic() + 60
            while (after := await http.get(f"{api}/health")).status_code != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return before, busy, after

    before, busy, after = asyncio.run(go())
    assert before.status_code == 200 and before.json()["status"] == "ok" and before.json()["reason"] is None
    assert before.json()["predicted_request_s"] > 0  # the plan predicts ms/token
    assert busy.status_code == 503, busy.text
    report = busy.json()
    assert report["status"] == "degraded" and "no sequence has been free" in report["reason"]
    assert report["sequences_busy"] == report["sequences"] == 4
    assert report["busy_s"] > report["predicted_request_s"]
    assert after.status_code == 200 and after.json()["status"] == "ok", after.text


# ------------------------------------------------------------------ the OpenAPI document
GENERATION = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def test_openapi_document_lists_what_the_server_answers(api, model_id):
    """The document names the real statuses (400s, not FastAPI's 422s) with the error object, the streams, this
    server's limits; a method a route lacks gets 405 with Allow."""
    doc = httpx.get(f"{api}/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert "422" not in op["responses"], (method, path)
            assert "401" not in op["responses"] and "security" not in op, (method, path)  # no API key here
    for path in GENERATION[:2]:
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "404", "413", "429", "500", "503"}
        for status in ("400", "404", "413", "429", "500", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == error
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(doc["paths"]["/health"]["get"]["responses"]) == {"200", "503"}
    body = doc["components"]["schemas"]["ChatCompletionBody"]["properties"]
    assert model_id in body["model"]["enum"]
    assert max(v.get("maximum", 0) for v in body["max_tokens"]["anyOf"]) == N_CTX
    for method, path, allowed in (
        ("TRACE", "/health", "GET"),
        ("GET", "/v1/completions", "POST"),
        ("DELETE", "/v1/models", "GET"),
    ):
        resp = httpx.request(method, f"{api}{path}")
        assert resp.status_code == 405 and allowed in resp.headers["allow"], (method, path, resp.headers)
        assert _error(resp, 405)


FUZZ_MAX_TOKENS = 2
"""The most a fuzzed request may generate: the document allows max_tokens up to the context, and answers of
N_CTX tokens (ignore_eos) would take minutes each."""


def _bound_generation(body) -> None:
    """Cap a fuzzed generation body's max_tokens/max_completion_tokens at :data:`FUZZ_MAX_TOKENS` where the value
    is valid (1 … N_CTX), and ask for that much where the body asks for no number (the default is 256). Invalid
    values stay as they are, for the server to refuse."""
    if not isinstance(body, dict):
        return

    def valid(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and 1 <= v <= N_CTX

    asked = [f for f in ("max_tokens", "max_completion_tokens", "max_output_tokens") if body.get(f) is not None]
    for field in asked:
        if valid(body[field]):
            body[field] = min(int(body[field]), FUZZ_MAX_TOKENS)
    if not asked:
        body["max_tokens" if "input" not in body else "max_output_tokens"] = FUZZ_MAX_TOKENS
    _consistent(body)


def _consistent(body: dict) -> None:
    """Make a fuzzed body's grammar, schemas and tool names ones the server can use, where they are of the
    documented types: what JSON Schema cannot say (a grammar llama.cpp parses, a schema its converter handles,
    a named function that is in ``tools``) gets a 400 naming the field (tests/test_tools.py), which the
    positive checks would count as a valid request refused. Values of other types stay, for the server to refuse."""
    if isinstance(body.get("grammar"), str) and body["grammar"]:  # "" is too short: the server refuses it
        body["grammar"] = 'root ::= "ok"'
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
            del body["grammar"]  # both: a 400 naming grammar
    for fmt in (
        body.get("response_format"),
        (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None,
    ):
        spec = (fmt.get("json_schema") if "json_schema" in fmt else fmt) if isinstance(fmt, dict) else None
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict):
            spec["schema"] = {"type": "object"}
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    names = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("parameters"), dict):
            fn["parameters"] = {"type": "object"}
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    choice = body.get("tool_choice")
    named = isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict)
    if named and isinstance(choice["function"].get("name"), str) or choice in ("auto", "required"):
        if not names and (body.get("tools") is None or isinstance(body["tools"], list)):  # it needs a tool
            body["tools"] = [*(body.get("tools") or []), {"type": "function", "function": {"name": "f"}}]
            names.append("f")
        if named and names:
            choice["function"]["name"] = names[0]
    for m in body.get("messages") or [] if isinstance(body.get("messages"), list) else []:
        for call in (
            (m.get("tool_calls") or []) if isinstance(m, dict) and isinstance(m.get("tool_calls"), list) else []
        ):
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                if not names and (body.get("tools") is None or isinstance(body["tools"], list)):  # it needs a tool
                    body["tools"] = [*(body.get("tools") or []), {"type": "function", "function": {"name": "f"}}]
                    names.append("f")
                if names:
                    fn["name"] = names[0]


def test_schemathesis_finds_the_server_as_the_document_says(api):
    """schemathesis (https://schemathesis.readthedocs.io) over /openapi.json with every check, through every
    phase its engine runs (examples, coverage — boundary values, every invalid form of every field, methods a
    route lacks —, fuzzing, stateful): no 5xx, statuses, content types, headers and bodies as documented,
    schema-valid requests accepted and invalid ones refused.

    Bounded to stay fast: a fixed seed, 5 fuzzed examples per operation, every generation capped at
    FUZZ_MAX_TOKENS tokens, and the generation routes' coverage phase in negative mode only (their
    schema-valid cases come from the fuzzing phase: the coverage phase's hundred-odd boundary-value
    combinations would each run the ring).
    """
    schemathesis = pytest.importorskip("schemathesis", reason="schemathesis needs Python 3.11 or later")
    from schemathesis.engine import StopReason, events, from_schema

    config = schemathesis.Config.from_dict(
        {
            "base-url": api,
            "workers": 1,
            "request-timeout": 120,
            "seed": 1,
            "generation": {"max-examples": 5},
            "operations": [{"include-method": "POST", "phases": {"coverage": {"generation": {"mode": "negative"}}}}],
        }
    )
    schema = schemathesis.openapi.from_url(f"{api}/openapi.json", config=config)

    @schema.hook
    def map_case(_context, case):
        if case.operation.path in GENERATION:
            _bound_generation(case.body)
        return case

    failures: dict[tuple, str] = {}
    errors: list[str] = []
    tested: set[str] = set()
    checks = 0
    finished = None
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            tested.add(event.recorder.label)
            for results in event.recorder.checks.values():
                for check in results:
                    checks += 1
                    if check.failure_info is not None:
                        f = check.failure_info.failure
                        failures.setdefault(
                            (event.recorder.label, check.name, f.title),
                            f"{f.message}\n{check.failure_info.code_sample}",
                        )
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.title}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert not errors, "\n".join(errors)
    assert not failures, "\n\n".join(
        f"{label} [{check}] {title}\n{detail}" for (label, check, title), detail in failures.items()
    )
    assert finished is not None and finished.stop_reason == StopReason.COMPLETED and not finished.failures
    documented = {f"{method.upper()} {path}" for path, item in schema.raw_schema["paths"].items() for method in item}
    assert documented <= tested, documented - tested
    assert checks > 1000


# ------------------------------------------------------------------ observability
def _sample(text: str, name: str, **labels) -> float:
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def test_metrics_parse_and_move(api, client, model_id):
    before = httpx.get(f"{api}/metrics").text
    families = {f.name for f in text_string_to_metric_families(before)}
    for name in (
        "homering_tokens_generated",
        "homering_request_latency_seconds",
        "homering_ttft_seconds",
        "homering_queue_depth",
        "homering_agents_up",
        "homering_window_compute_seconds",
    ):
        assert name in families, name
    resp = chat(client, model_id, PROMPTS[2])
    time.sleep(2.5)  # agents publish their window timings every 2 s
    after = httpx.get(f"{api}/metrics").text
    n = resp.usage.completion_tokens
    assert _sample(after, "homering_tokens_generated_total") - _sample(before, "homering_tokens_generated_total") == n
    assert (
        _sample(after, "homering_request_latency_seconds_count")
        == _sample(before, "homering_request_latency_seconds_count") + 1
    )
    assert _sample(after, "homering_ttft_seconds_count") == _sample(before, "homering_ttft_seconds_count") + 1
    assert _sample(after, "homering_agents_up") == 2
    per_agent = {
        s.labels["agent"]
        for f in text_string_to_metric_families(after)
        for s in f.samples
        if s.name == "homering_window_compute_seconds_total" and s.value > 0
    }
    assert len(per_agent) == 2
    assert _sample(after, "homering_window_compute_seconds_total") > _sample(
        before, "homering_window_compute_seconds_total"
    )


def test_metrics_pass_promtool_and_cover_every_agent_up(api, client, model_id):
    """The live `/metrics` (after a request, with every family sampled) passes `promtool check metrics`,
    and `homering_agent_rss_bytes` has a sample for each agent that is up."""
    chat(client, model_id, PROMPTS[3])
    time.sleep(2.5)  # agents publish their stats (window timings, RSS) every second
    text = httpx.get(f"{api}/metrics").text
    agents = httpx.get(f"{api}/v1/cluster").json()["agents"]
    up = {a["name"] for a in agents if a["status"] != "offline"}  # the broker may remember earlier tests'
    rss = {
        s.labels["agent"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "homering_agent_rss_bytes"
    }
    assert _sample(text, "homering_agents_up") == len(up) == 2
    assert set(rss) == up and all(v > 0 for v in rss.values())
    assert _sample(text, "homering_predicted_seconds_per_token") > 0
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package ships /usr/bin/promtool)")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cluster_report(api, smollm2, mosquitto):
    report = httpx.get(f"{api}/v1/cluster").json()
    assert report["broker"] == str(mosquitto)
    agents = [a for a in report["agents"] if a["status"] != "offline"]  # the broker may remember earlier tests'
    assert len(agents) == 2 and sum(a["head"] for a in agents) == 1
    for a in agents:
        assert a["status"] == "ready" and a["pid"] > 0 and a["data_port"] > 0 and a["profile"]
    windows = sorted((w["start"], w["end"]) for a in agents for w in a["windows"])
    assert windows[0][0] == 0 and windows[-1][1] == 30
    assert all(x[1] == y[0] for x, y in zip(windows, windows[1:]))
    plan = report["plan"]
    assert plan["predicted_ms_per_token"] > 0 and plan["measured_ms_per_token"] > 0
    assert plan["head"] == next(a["name"] for a in agents if a["head"])


def test_home_assistant_discovery_configs(api, mosquitto):
    """`up --ha-discovery`: both agents and the controller appear as Home Assistant devices."""
    import aiomqtt

    async def collect():
        got = {}
        async with aiomqtt.Client(mosquitto.host, mosquitto.port) as c:
            await c.subscribe("homeassistant/#")

            async def read():
                async for m in c.messages:
                    got[m.topic.value] = json.loads(m.payload)

            try:
                await asyncio.wait_for(read(), 3)
            except asyncio.TimeoutError:
                pass
        return got

    configs = asyncio.run(collect())
    devices = {tuple(c["device"]["identifiers"]) for c in configs.values()}
    assert len(devices) == 3  # two agents and the controller
    for topic, c in configs.items():
        assert topic.endswith("/config")
        assert {"name", "state_topic", "unique_id", "device"} <= set(c)
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)


def test_a_10000_message_request_beside_a_stream_changes_nothing(api, model_id):
    """Huge chats are refused (413) without blocking the controller's loop: a greedy stream running beside
    them completes with the same text, and no agent is declared lost (the plan stays)."""
    prompt = "Tell me a long story about a lighthouse."
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 64,
        "ignore_eos": True,
    }
    expected = httpx.post(f"{api}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
    plan_before = httpx.get(f"{api}/v1/cluster").json()["plan"]["plan_id"]

    async def go():
        async with httpx.AsyncClient(timeout=180) as http:
            answer = asyncio.create_task(http.post(f"{api}/v1/chat/completions", json=body))
            floods = [
                http.post(
                    f"{api}/v1/chat/completions",
                    json={"model": model_id, "messages": [{"role": "user", "content": "x"}] * n},
                )
                for n in (10_000, N_CTX - 1)
            ]
            return await answer, await asyncio.gather(*floods)

    answer, floods = asyncio.run(go())
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"] == expected
    errors = [_error(flood, 413) for flood in floods]
    assert all(e["code"] == "context_length_exceeded" for e in errors)
    assert "cannot fit the context" in errors[0]["message"]  # 10,000 messages: refused before tokenizing
    assert "tokens but the context holds" in errors[1]["message"]  # counted, in the tokenizer's thread
    cluster = httpx.get(f"{api}/v1/cluster").json()
    assert cluster["plan"]["plan_id"] == plan_before and cluster["state"] == "ready"


def test_a_body_too_large_for_the_context_is_refused_before_it_is_read(api, model_id):
    """413 with an error object for a 10 MB body, by its Content-Length and streamed in chunks; the server lives."""
    url = f"{api}/v1/chat/completions"
    big = json.dumps({"model": model_id, "messages": [{"role": "user", "content": "x" * (10 << 20)}]}).encode()
    assert (
        _error(httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=60), 413)["code"]
        == "request_too_large"
    )

    def chunks():
        for i in range(0, len(big), 1 << 16):
            yield big[i : i + (1 << 16)]

    assert (
        _error(httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=60), 413)["code"]
        == "request_too_large"
    )
    assert httpx.get(f"{api}/health").status_code == 200

"""The app in process, over a stand-in ClusterView (no cluster): its OpenAPI document (what an API key adds, the
request bodies' limits), a refused request's error object, answers and streams. tests/test_api.py checks the live
document against the live server (schemathesis) and the routes end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from homering.api.app import create_app

KEY = "sk-test-key"


def _controller(n_ctx: int = 512, n_vocab: int = 1000) -> SimpleNamespace:
    return SimpleNamespace(
        model_id="tiny", model_path=Path("/models/tiny.gguf"), n_ctx=n_ctx, tokenizer=SimpleNamespace(n_vocab=n_vocab)
    )


@pytest.mark.parametrize("key", [None, KEY])
def test_the_document_has_no_422_and_401s_only_with_a_key(key):
    doc = create_app(_controller(), api_key=key).openapi()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            if key and path != "/health":
                assert op["security"] == [{"bearer": []}], (method, path)
                assert responses["401"]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"
                }
                assert "WWW-Authenticate" in responses["401"]["headers"]
            else:
                assert "401" not in responses and "security" not in op, (method, path)
    assert ("securitySchemes" in doc["components"]) == bool(key)


def test_the_document_states_this_servers_limits():
    doc = create_app(_controller(n_ctx=512, n_vocab=1000)).openapi()
    schemas = doc["components"]["schemas"]
    for body in ("ChatCompletionBody", "CompletionBody"):
        props = schemas[body]["properties"]
        assert props["model"]["enum"] == ["tiny", "tiny.gguf"]
        for field in ("max_tokens", "max_completion_tokens"):
            assert [v["maximum"] for v in props[field]["anyOf"] if v.get("type") == "integer"] == [512]
        assert [v["maxItems"] for v in props["stop"]["anyOf"] if v.get("type") == "array"] == [4]
    ids = [
        v
        for v in schemas["CompletionBody"]["properties"]["prompt"]["anyOf"]
        if v.get("items", {}).get("type") == "integer"
    ]
    assert ids[0]["items"] == {"type": "integer", "minimum": 0, "maximum": 999} and ids[0]["minItems"] == 1
    assert schemas["_ContentPart"]["properties"]["type"]["enum"] == ["text"]
    for chunk in ("ChatCompletionChunk", "CompletionChunk"):  # the streams' events refer to them
        assert chunk in schemas


def test_a_method_a_route_lacks_gets_405_with_allow_and_an_error_object():
    http = TestClient(create_app(_controller()))
    for method, path, allowed in (
        ("TRACE", "/health", "GET"),
        ("PUT", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models/tiny", "GET"),
    ):
        resp = http.request(method, path)
        assert resp.status_code == 405, (method, path)
        assert allowed in resp.headers["allow"]
        assert resp.json()["error"]["message"]


def test_integral_numbers_are_integers_as_json_schema_says():
    """16.0 is the integer 16 in JSON Schema: accepted where an integer is; "16", true and 16.5 are not."""
    from homering.api.schemas import ChatCompletionBody

    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionBody.model_validate(base | {"max_tokens": 16.0, "seed": 3.0, "n": 1.0}).max_tokens == 16
    for bad in ("16", True, 16.5):
        with pytest.raises(ValueError):
            ChatCompletionBody.model_validate(base | {"max_tokens": bad})


def _view(events=None, refused=None) -> SimpleNamespace:
    """A stand-in ClusterView: ready, one agent, a plan; ``submit`` answers ``events`` or raises ``refused``."""
    from homering.wire import AgentProfile, Plan, PlanAgent, WindowAssignment

    plan = Plan(
        plan_id="p1",
        model_path="/models/tiny.gguf",
        model_fingerprint="f",
        n_layers=2,
        n_ctx=512,
        planner="test",
        predicted_ms_per_token=10.0,
        ring=[PlanAgent(name="a", host="h", data_port=9, windows=[WindowAssignment(start=0, end=2)])],
    )

    async def submit(req):
        if refused is not None:
            raise refused
        for ev in events or []:
            yield ev.model_copy(update={"request_id": req.request_id})

    profile = AgentProfile(
        name="a", host="h", pid=1, data_port=9, os="linux", cpu_count=2, threads=1, ram_total=1, ram_available=1
    )
    view = _controller()
    view.__dict__.update(
        broker="mqtt://127.0.0.1:1883",
        n_parallel=2,
        api_key=None,
        started=1.0,
        fingerprint="fp",
        plan=plan,
        state="ready",
        detail=None,
        ready=True,
        profiles={"a": profile},
        statuses={},
        agent_stats={},
        links={"a": (0.5, 900.0)},
        in_flight={},
        measured_ms_per_token=None,
        sequences=SimpleNamespace(n=2, in_use=0, queue_depth=0, busy_since=None),
        live_agents=lambda: [SimpleNamespace(name="a")],
        submit=submit,
        window_file=lambda sha256: None,
    )
    return view


def test_a_refused_request_is_an_error_object_with_its_status_and_code():
    from homering.api.view import RequestRefused

    http = TestClient(create_app(_view(refused=RequestRefused(429, "the queue is full", code="queue_full"))))
    resp = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 429
    assert resp.json() == {
        "error": {"message": "the queue is full", "type": "rate_limit_error", "param": None, "code": "queue_full"}
    }


def test_answers_and_streams_of_a_stand_in_cluster():
    from homering.wire import EventType, StreamEvent

    events = [
        StreamEvent(request_id="x", type=EventType.TOKEN, text="hel"),
        StreamEvent(
            request_id="x",
            type=EventType.DONE,
            text="lo",
            token_ids=[1, 2],
            prompt_token_ids=[3],
            finish_reason="length",
        ),
    ]
    http = TestClient(create_app(_view(events)))
    body = {"model": "tiny.gguf", "prompt": "hi", "max_tokens": 2}
    answer = http.post("/v1/completions", json=body).json()
    assert answer["choices"][0]["text"] == "hello" and answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert answer["system_fingerprint"] == "fp"
    stream = http.post(
        "/v1/chat/completions",
        json={
            "model": "tiny",
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True},
        },
    ).text
    data = [line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "hello"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 3
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    cluster = http.get("/v1/cluster").json()
    assert cluster["agents"][0]["link_ms"] == 0.5 and cluster["agents"][0]["head"] and cluster["plan"]["ring"] == ["a"]
    assert http.get(f"/v1/windows/{'0' * 64}").status_code == 404

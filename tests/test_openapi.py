"""The OpenAPI document of the app, in process (a stand-in controller; no cluster): what an API key adds, and
the request bodies' limits. tests/test_api.py checks the live document against the live server (schemathesis)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from homering.api.openai import create_app

KEY = "sk-test-key"


def _controller(n_ctx: int = 512, n_vocab: int = 1000) -> SimpleNamespace:
    return SimpleNamespace(model_id="tiny", model_path=Path("/models/tiny.gguf"), n_ctx=n_ctx,
                           tokenizer=SimpleNamespace(n_vocab=n_vocab))


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
                    "$ref": "#/components/schemas/ErrorResponse"}
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
    ids = [v for v in schemas["CompletionBody"]["properties"]["prompt"]["anyOf"]
           if v.get("items", {}).get("type") == "integer"]
    assert ids[0]["items"] == {"type": "integer", "minimum": 0, "maximum": 999} and ids[0]["minItems"] == 1
    assert schemas["_ContentPart"]["properties"]["type"]["enum"] == ["text"]
    for chunk in ("ChatCompletionChunk", "CompletionChunk"):  # the streams' events refer to them
        assert chunk in schemas


def test_a_method_a_route_lacks_gets_405_with_allow_and_an_error_object():
    http = TestClient(create_app(_controller()))
    for method, path, allowed in (("TRACE", "/health", "GET"), ("PUT", "/v1/chat/completions", "POST"),
                                  ("POST", "/v1/models/tiny", "GET")):
        resp = http.request(method, path)
        assert resp.status_code == 405, (method, path)
        assert allowed in resp.headers["allow"]
        assert resp.json()["error"]["message"]


def test_integral_numbers_are_integers_as_json_schema_says():
    """16.0 is the integer 16 in JSON Schema: accepted where an integer is; "16", true and 16.5 are not."""
    from homering.api.openai import ChatCompletionBody

    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatCompletionBody.model_validate(base | {"max_tokens": 16.0, "seed": 3.0, "n": 1.0}).max_tokens == 16
    for bad in ("16", True, 16.5):
        with pytest.raises(ValueError):
            ChatCompletionBody.model_validate(base | {"max_tokens": bad})

"""The Ollama and Anthropic routes and the web UI's files in process, over test_openapi's stand-in ClusterView
(no cluster): what reaches each API's clients through the OpenAI route, the errors' formats, and that the page
and its files are served without a key and stay out of the OpenAPI document. tests/test_doors.py and
tests/test_webui.py run them on a real cluster with the official clients and a real browser."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from homering.api.app import create_app
from tests.test_openapi import KEY, _view

USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("key", [None, KEY])
def test_the_web_ui_is_served_at_the_root_without_a_key_and_outside_the_document(key):
    """The page and its files are open (they hold no secret; the page asks for the key); the document describes
    the OpenAI API only (the Ollama and Anthropic routes follow their own references)."""
    app = create_app(_view(), api_key=key)
    http = TestClient(app)
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = set(re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text))
    assert assets == {"/ui/app.js", "/ui/markdown.js", "/ui/style.css"}
    for src in assets:
        asset = http.get(src)
        assert asset.status_code == 200 and asset.text, src
        assert "http://" not in asset.text and "https://" not in asset.text, src  # nothing from elsewhere (no CDN)
    paths = app.openapi()["paths"]
    assert "/" not in paths and "/v1/messages" not in paths and not [p for p in paths if p.startswith(("/api/", "/ui"))]
    if key:
        assert http.get("/api/tags").status_code == 401 and set(http.get("/api/tags").json()) == {"error"}
        refused = http.post("/v1/messages", json={})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert http.get("/api/tags", headers={"Authorization": f"Bearer {KEY}"}).status_code != 401
        assert http.post("/v1/messages", json={}, headers={"x-api-key": KEY}).status_code == 400


def _events():
    from homering.wire import EventType, StreamEvent

    return [
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


def test_ollama_answers_and_streams_through_the_openai_route():
    http = TestClient(create_app(_view(_events())))
    chat = http.post("/api/chat", json={"model": "tiny:latest", "messages": USER, "stream": False}).json()
    assert chat["message"] == {"role": "assistant", "content": "hello"} and chat["done_reason"] == "length"
    assert chat["eval_count"] == 2 and chat["prompt_eval_count"] == 1
    streamed = http.post("/api/generate", json={"model": "tiny", "prompt": "hi"})
    assert streamed.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in streamed.text.splitlines()]
    assert [x["response"] for x in lines] == ["hel", "lo", ""] and [x["done"] for x in lines] == [False, False, True]
    assert lines[-1]["prompt_eval_count"] == 1 and lines[-1]["eval_count"] == 2
    unknown = http.post("/api/chat", json={"model": "other", "messages": USER})
    assert unknown.status_code == 404 and set(unknown.json()) == {"error"} and "model" in unknown.json()["error"]
    bad = http.post("/api/chat", json={"model": "tiny", "messages": USER, "options": {"top_k": -1}})
    assert bad.status_code == 400 and bad.json()["error"].startswith("options.top_k")


def test_anthropic_answers_and_streams_through_the_openai_route():
    http = TestClient(create_app(_view(_events())))
    msg = http.post("/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": USER}).json()
    assert msg["content"] == [{"type": "text", "text": "hello"}] and msg["stop_reason"] == "max_tokens"
    assert msg["usage"] == {"input_tokens": 1, "output_tokens": 2}
    stream = http.post("/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": USER, "stream": True}).text
    assert re.findall(r"^event: (\w+)$", stream, flags=re.M) == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    bad = http.post("/v1/messages", json={"model": "tiny", "max_tokens": 0, "messages": USER})
    assert bad.status_code == 400 and bad.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Input should be greater than or equal to 1",
    }

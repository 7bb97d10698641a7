"""``POST /v1/embeddings`` through the real `openai` SDK against a real cluster (`homering up`: 2 agents on
mosquitto, a real ring; and 1 agent alone), on SmolLM2-135M: each vector is the mean of the unsplit model's
own per-token embeddings (llama-cpp-python, ``embedding=True``, pooling NONE: the output norm's result), the
gold standard."""

from __future__ import annotations

import base64
import subprocess
import sys

import httpx
import llama_cpp
import numpy as np
import openai
import pytest

from homering.client.local import stop_processes
from homering.engine.window import LayerWindow, plain_llama
from homering.transport.broker import free_port
from tests.conftest import wait_healthy

N_CTX = 512
BATCH = 16  # a prompt longer than this crosses the ring as several micro-batches
SHORT = "The capital of France is Paris."
LONG = (
    "Homering runs large language models on the computers of a home: each agent holds a window of layers, "
    "and the hidden states go around the ring from one agent to the next until the head samples a token."
)


@pytest.fixture(scope="module")
def gold(smollm2):
    """text → (mean of the unsplit model's per-token embeddings (n_embd,), its token ids)."""
    llm = plain_llama(
        smollm2,
        embedding=True,
        pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_threads=1,
        flash_attn=True,  # as the windows' contexts (llama.cpp's default there)
        verbose=False,
    )

    def mean(text: str) -> tuple[np.ndarray, list[int]]:
        tokens = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert llm.tokenize(llm.detokenize(tokens), add_bos=True, special=False) == tokens  # what embed() runs
        rows = np.asarray(llm.embed(llm.detokenize(tokens).decode(), normalize=False), dtype=np.float64)
        assert rows.shape == (len(tokens), llm.n_embd())
        return rows.mean(axis=0), tokens

    yield mean
    llm.close()


@pytest.fixture(scope="module", params=[2, 1], ids=["ring", "alone"])
def served(request, smollm2, mosquitto, tmp_path_factory):
    """(client, model id, base URL) of a cluster of 2 agents (the proportional planner: a real ring), or of 1
    (the head runs every window itself); one at a time: the clusters would share the broker's topics."""
    port = free_port()
    args = ["up", "--agents", str(request.param), "--model", str(smollm2), "--broker", str(mosquitto), "--threads", "1"]
    args += ["--ctx", str(N_CTX), "--batch", str(BATCH), "--planner", "proportional", "--api-port", str(port)]
    args += ["--no-chat", "--parallel", "2"]
    log_path = tmp_path_factory.mktemp("logs") / "up.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "homering", *args], stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_healthy(base, [proc], log_path=log_path)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
            yield client, client.models.list().data[0].id, base
        finally:
            stop_processes([proc], 30)


def test_window_embeddings_are_the_unsplit_models(smollm2, gold):
    """A whole-model window's per-token embeddings (``forward_many(..., embed=[True])``), mean-pooled, are
    llama-cpp-python's; the same window then still gives logits."""
    with LayerWindow(smollm2, takes_tokens=True, gives_logits=True, n_ctx=N_CTX, n_batch=BATCH, n_threads=1) as w:
        want, ids = gold(LONG)
        tokens, n = np.asarray(ids, np.int32), len(ids)
        assert n > 2 * BATCH  # several llama_decode calls
        out = w.forward_many([(tokens, 0, 0)], None, [True])[0]
        assert out.logits is None and out.hidden is not None and out.hidden.shape == (n, w.n_embd)
        np.testing.assert_allclose(out.hidden.mean(axis=0), want, atol=1e-3)
        after = w.forward(np.asarray([tokens[0]], np.int32), n, 0)
        assert after.logits is not None and after.logits.shape == (w.n_vocab,)


def test_embeddings_are_the_unsplit_models_mean(served, gold):
    client, model, _ = served
    out = client.embeddings.create(model=model, input=[SHORT, LONG], encoding_format="float")
    assert [d.index for d in out.data] == [0, 1] and out.model == model
    vectors = [np.asarray(d.embedding) for d in out.data]
    assert all(v.shape == (576,) and np.isfinite(v).all() for v in vectors)
    (short, ids_short), (long, ids_long) = gold(SHORT), gold(LONG)
    n_short, n_long = len(ids_short), len(ids_long)
    assert n_long > 2 * BATCH  # the long input crossed the ring in several micro-batches
    np.testing.assert_allclose(vectors[0], short, atol=1e-3)
    np.testing.assert_allclose(vectors[1], long, atol=1e-3)
    assert out.usage.prompt_tokens == out.usage.total_tokens == n_short + n_long
    assert np.abs(vectors[0] - vectors[1]).max() > 0.1  # different texts, different vectors


def test_token_id_inputs_are_the_unsplit_models_mean(served, gold):
    """OpenAI's token forms: one list of ids, and a list of id lists; each is the unsplit model's mean over
    exactly those tokens."""
    client, model, _ = served
    (short, ids_short), (long, ids_long) = gold(SHORT), gold(LONG)
    one = client.embeddings.create(model=model, input=ids_short, encoding_format="float")
    two = client.embeddings.create(model=model, input=[ids_long, ids_short], encoding_format="float")
    np.testing.assert_allclose(np.asarray(one.data[0].embedding), short, atol=1e-3)
    np.testing.assert_allclose(np.asarray(two.data[0].embedding), long, atol=1e-3)
    np.testing.assert_allclose(np.asarray(two.data[1].embedding), short, atol=1e-3)
    assert one.usage.prompt_tokens == len(ids_short) and two.usage.prompt_tokens == len(ids_short) + len(ids_long)


def test_same_text_same_vector_and_base64(served):
    client, model, base = served
    default = client.embeddings.create(model=model, input=SHORT)  # the SDK asks for base64 and decodes it
    again = client.embeddings.create(model=model, input=[SHORT], encoding_format="float")
    assert np.array_equal(np.asarray(default.data[0].embedding, np.float32), np.asarray(again.data[0].embedding))
    raw = httpx.post(f"{base}/v1/embeddings", json={"model": model, "input": SHORT, "encoding_format": "base64"})
    assert raw.status_code == 200
    vec = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(vec, np.asarray(again.data[0].embedding, np.float32))


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "input": "hi"}, 404, "model"),
        ({"input": "hi"}, 400, "model"),
        ({"model": "M", "input": ""}, 400, "input"),
        ({"model": "M", "input": []}, 400, "input"),
        ({"model": "M", "input": [[]]}, 400, "input"),
        ({"model": "M", "input": [1, "a"]}, 400, "input.str"),  # pydantic names the union member it tried
        ({"model": "M", "input": [10**9]}, 400, None),  # beyond the vocabulary: the controller says so
        ({"model": "M", "input": "hi", "encoding_format": "hex"}, 400, "encoding_format"),
        ({"model": "M", "input": "hi", "dimensions": 3}, 400, "dimensions"),
        ({"model": "M", "input": "word " * N_CTX}, 413, None),
    ],
)
def test_bad_requests_are_error_objects(served, body, status, param):
    _, model, base = served
    body = {**body, "model": model} if body.get("model") == "M" else body
    r = httpx.post(f"{base}/v1/embeddings", json=body, timeout=120)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"] == param)

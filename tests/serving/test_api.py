"""The HTTP API through starlette's TestClient: bodies and errors in OpenAI's format, SSE
streaming, the adapter endpoints, auth and metrics. Reference: the engine's own result for the
same request (the API must add nothing and lose nothing)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from serving_helpers import BASE
from splice.serving import SamplingParams
from splice.serving.api import create_app

KEY = "sk-test-123"


@pytest.fixture
def engine(make_engine):
    return make_engine()


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine)) as client:
        yield client


def engine_text(engine, tokenizer, prompt: str, model: str, max_tokens: int) -> str:
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    return engine.submit(ids, model, SamplingParams(max_tokens=max_tokens, temperature=0)
                         ).result(timeout=60).text


def sse_events(response) -> list:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_models_lists_the_base_and_the_adapters(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [BASE, "a", "b", "c"]


def test_completion_equals_the_engine_result(client, engine, tokenizer):
    body = {"model": "b", "prompt": "Hello", "max_tokens": 9, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == engine_text(engine, tokenizer, "Hello", "b", 9)
    assert data["choices"][0]["finish_reason"] in ("length", "stop")
    usage = data["usage"]
    assert usage["prompt_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_applies_the_template_and_streams_the_same_text(client, engine, tokenizer):
    messages = [{"role": "user", "content": "Hi!"}]
    body = {"model": "a", "messages": messages, "max_tokens": 12, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=body).json()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = engine_text(engine, tokenizer, text, "a", 12)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": expected}

    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_events(response)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_streamed_completion_chunks_add_up(client, engine, tokenizer):
    body = {"model": BASE, "prompt": "abc", "max_tokens": 7, "temperature": 0, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as response:
        chunks = sse_events(response)
    assert "".join(c["choices"][0]["text"] for c in chunks) == engine_text(
        engine, tokenizer, "abc", BASE, 7)
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


@pytest.mark.parametrize("body, field", [
    ({"model": "a", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "a", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "a", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x"}, "model"),
    ({"model": "a", "prompt": "x", "n": 2}, "n"),
    ({"model": "a", "prompt": ["x", "y"]}, "prompt"),
    ({"model": "a", "prompt": "x", "stop": 5}, "stop"),
    ({"model": "a", "messages": []}, "prompt"),
])
def test_bad_parameters_are_a_400_naming_the_field(client, body, field):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"]


def test_malformed_json_is_a_400(client):
    response = client.post("/v1/chat/completions", content=b'{"model": "a", "messages": [',
                           headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


def test_unknown_model_is_a_404_naming_the_list_endpoint(client):
    for name in ("nope", "../../etc/passwd", "a/../b"):
        response = client.post("/v1/completions", json={"model": name, "prompt": "x"})
        assert response.status_code == 404
        assert "GET /v1/models" in response.json()["error"]["message"]


def test_a_prompt_over_the_context_length_is_a_400(client):
    response = client.post("/v1/completions",
                           json={"model": "a", "prompt": "x" * 80, "max_tokens": 20})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_a_full_queue_is_a_429_with_retry_after(make_engine):
    engine = make_engine(start=False, max_queue=1)   # nothing drains the queue
    engine.submit([1, 2], "a", SamplingParams())
    with TestClient(create_app(engine)) as client:
        response = client.post("/v1/completions", json={"model": "a", "prompt": "x"})
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"


def test_the_api_key_is_required_when_set(engine):
    with TestClient(create_app(engine, api_key=KEY)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 401
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                          ).status_code == 200


def test_adding_and_deleting_adapters(client, tmp_path):
    folder = str(tmp_path / "folders" / "d")
    assert client.post("/v1/adapters", json={"name": "d", "path": folder}).status_code == 201
    assert "d" in [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert client.post("/v1/completions", json={"model": "d", "prompt": "x"}).status_code == 200
    again = client.post("/v1/adapters", json={"name": "d", "path": folder})
    assert again.status_code == 409
    assert client.post("/v1/adapters", json={"name": "d", "path": folder, "replace": True}
                       ).status_code == 201
    assert client.delete("/v1/adapters/d").status_code == 200
    assert client.post("/v1/completions", json={"model": "d", "prompt": "x"}).status_code == 404
    assert client.delete("/v1/adapters/d").status_code == 404


def test_adapter_names_and_folders_are_checked(client, tmp_path):
    bad_name = client.post("/v1/adapters", json={"name": "../x", "path": str(tmp_path)})
    assert bad_name.status_code == 400 and bad_name.json()["error"]["param"] == "name"
    not_adapter = client.post("/v1/adapters", json={"name": "e", "path": str(tmp_path)})
    assert not_adapter.status_code == 400
    assert not (tmp_path / "x").exists()


def test_metrics_count_requests_and_tokens(client):
    for _ in range(2):
        client.post("/v1/completions", json={"model": "a", "prompt": "x", "max_tokens": 3,
                                             "temperature": 0})
    text = client.get("/metrics").text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert values['splice_requests_total{outcome="ok"}'] == "2"
    assert 2 <= int(values["splice_generated_tokens_total"]) <= 6
    for name in ("splice_queue_depth", "splice_tokens_per_second", "splice_adapters_resident"):
        assert name in values
    assert values["splice_adapters_resident"] == "1"

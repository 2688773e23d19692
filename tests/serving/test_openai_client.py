"""The official `openai` client against a real uvicorn server on loopback, streaming and not.
Reference: the engine's own result for the same request."""

from __future__ import annotations

import openai
import pytest

from serving_helpers import BASE
from splice.serving import SamplingParams
from splice.serving.api import create_app
from splice.serving.server import ServerThread

KEY = "sk-local"


@pytest.fixture
def served(make_engine):
    engine = make_engine()
    with ServerThread(create_app(engine, api_key=KEY)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                               timeout=60)
        yield engine, client, server


def expected(engine, tokenizer, text: str, model: str, max_tokens: int) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return engine.submit(ids, model, SamplingParams(max_tokens=max_tokens, temperature=0)
                         ).result(timeout=60).text


def test_models_and_completions(served, tokenizer):
    engine, client, _ = served
    assert [m.id for m in client.models.list()] == [BASE, "a", "b", "c"]
    out = client.completions.create(model="c", prompt="Tell me", max_tokens=8, temperature=0)
    assert out.choices[0].text == expected(engine, tokenizer, "Tell me", "c", 8)
    assert 1 <= out.usage.completion_tokens <= 8
    pieces = client.completions.create(model="c", prompt="Tell me", max_tokens=8, temperature=0,
                                       stream=True)
    assert "".join(p.choices[0].text for p in pieces) == out.choices[0].text


def test_chat_streaming_and_not(served, tokenizer):
    engine, client, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    reply = client.chat.completions.create(model="a", messages=messages, max_tokens=10,
                                           temperature=0)
    assert reply.choices[0].message.content == expected(engine, tokenizer, text, "a", 10)
    stream = client.chat.completions.create(model="a", messages=messages, max_tokens=10,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_client_errors(served):
    _, client, server = served
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        client.completions.create(model="zzz", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="a", prompt="x", temperature=5)
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()

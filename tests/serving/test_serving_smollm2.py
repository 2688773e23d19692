"""The server on SmolLM2-135M with a library of three LoRA adapters (random non-zero B): each
request's tokens alone equal its tokens in a busy mixed batch (and its logits, bit for bit),
and the official client gets the same reply over HTTP."""

from __future__ import annotations

import openai
import pytest
import torch

import splice
from helpers import randomize_adapter
from serving_helpers import record_logits
from splice.library import AdapterLibrary
from splice.serving import Engine, SamplingParams, ServeConfig
from splice.serving.api import create_app
from splice.serving.server import ServerThread

pytestmark = pytest.mark.integration
BASE = "smollm2-135m"
FRANCE = "What is the capital of France? Answer in one sentence."
QUESTIONS = [FRANCE, FRANCE, "Name a color.", "Say hi."]
MODELS = [BASE, "a", "b", "c"]


@pytest.fixture
def engine(smollm2_fresh, tmp_path):
    model, tokenizer = smollm2_fresh
    library = AdapterLibrary(tmp_path / "library")
    for seed, name in enumerate("abc"):
        splice.attach(model, splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]), name)
        randomize_adapter(model, name, seed=seed, scale=0.2)
        splice.save_adapter(model, tmp_path / name, name)
        splice.delete_adapter(model, name)
        library.add(name, tmp_path / name, model=model)
    engine = Engine(model, tokenizer, library, ServeConfig(max_batch=4), base_name=BASE).start()
    yield engine, tokenizer
    engine.close()


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def test_smollm2_rows_alone_equal_rows_in_a_busy_batch_and_over_http(engine, monkeypatch):
    engine, tokenizer = engine
    seen = record_logits(monkeypatch)
    solo_params = [SamplingParams(max_tokens=6, temperature=0) for _ in QUESTIONS]
    busy_params = [SamplingParams(max_tokens=6, temperature=0) for _ in QUESTIONS]
    solo = [engine.submit(chat_ids(tokenizer, q), m, p).result(timeout=120)
            for q, m, p in zip(QUESTIONS, MODELS, solo_params)]
    handles = [engine.submit(chat_ids(tokenizer, q), m, p)
               for q, m, p in zip(QUESTIONS, MODELS, busy_params)]
    busy = [h.result(timeout=120) for h in handles]
    for i, (one, many) in enumerate(zip(solo, busy)):
        assert many.token_ids == one.token_ids, (MODELS[i], one.text, many.text)
        for a, b in zip(seen[id(solo_params[i])], seen[id(busy_params[i])]):
            assert torch.equal(a, b), MODELS[i]
    # the base's greedy answer is the known one, and an adapter changes it
    assert solo[0].text.startswith("The capital of France is")
    assert solo[1].token_ids != solo[0].token_ids

    with ServerThread(create_app(engine)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                               timeout=120)
        stream = client.chat.completions.create(
            model="b", messages=[{"role": "user", "content": QUESTIONS[2]}], max_tokens=6,
            temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == solo[2].text

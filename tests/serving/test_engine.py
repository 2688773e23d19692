"""The engine: continuous batching over mixed adapters, isolation, sampling, limits, residency.

References: each request run alone through the same engine (bit-identical tokens expected, see
Note: Batch-invariant decoding), and `model.generate` with the adapter attached and active (a
dense recomputation by transformers, whose batch of one may differ in the last ulp: tokens are
compared, on prompts whose greedy margins are far above that)."""

from __future__ import annotations

import threading

import pytest
import torch

import splice
from serving_helpers import BASE, record_logits, tiny_chat_llama
from splice.serving import (ContextLengthError, Delta, Finished, QueueFullError, SamplingParams,
                            UnknownModelError)
from splice.serving.api import add_to_library
from splice.serving.schemas import AdapterBody

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
PROMPTS = ["Hello there", "a", "The quick brown fox", "12+7=", "zzz", "Once upon a time, in"]
MODELS = ["a", BASE, "b", "c", "a", "b"]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def alone(engine, tokenizer, prompt: str, model: str, params=GREEDY) -> Finished:
    return engine.submit(ids(tokenizer, prompt), model, params).result(timeout=60)


def test_rows_in_a_busy_mixed_batch_equal_each_row_alone(make_engine, tokenizer, monkeypatch):
    engine = make_engine(max_batch=4)
    seen = record_logits(monkeypatch)
    solo_params = [SamplingParams(max_tokens=10, temperature=0) for _ in PROMPTS]
    busy_params = [SamplingParams(max_tokens=10, temperature=0) for _ in PROMPTS]
    solo = [alone(engine, tokenizer, p, m, params)
            for p, m, params in zip(PROMPTS, MODELS, solo_params)]
    steps_before = engine.metrics.steps
    handles = [engine.submit(ids(tokenizer, p), m, params)
               for p, m, params in zip(PROMPTS, MODELS, busy_params)]
    busy = [h.result(timeout=60) for h in handles]
    for i, (one, many) in enumerate(zip(solo, busy)):
        assert many.token_ids == one.token_ids, f"request {i} ({MODELS[i]})"
        assert many.text == one.text
        for step, (a, b) in enumerate(zip(seen[id(solo_params[i])], seen[id(busy_params[i])])):
            assert torch.equal(a, b), f"request {i} ({MODELS[i]}), token {step}: logits differ"
    # they did share steps: fewer forwards than tokens (6 requests over 4 rows join and leave)
    assert engine.metrics.steps - steps_before < sum(len(r.token_ids) for r in busy)
    # and the adapters matter, so equal tokens above mean each row got its own adapter
    outputs = {m: alone(engine, tokenizer, PROMPTS[0], m).token_ids for m in ("a", "b", "c", BASE)}
    assert len(set(outputs.values())) == 4


@pytest.mark.parametrize("invariant", [True, False])
@pytest.mark.parametrize("model", ["a", BASE])
def test_greedy_tokens_equal_transformers_generate(make_engine, tokenizer, library, model,
                                                   invariant):
    engine = make_engine(batch_invariant=invariant)
    reference = tiny_chat_llama(tokenizer)
    if model != BASE:
        library.load_into(reference, model)
    for prompt in PROMPTS[:3]:
        prompt_ids = torch.tensor([ids(tokenizer, prompt)])
        out = reference.generate(prompt_ids, max_new_tokens=GREEDY.max_tokens, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.eos_token_id)
        expected = out[0, prompt_ids.shape[1]:].tolist()
        got = alone(engine, tokenizer, prompt, model)
        assert list(got.token_ids) == [t for t in expected if t != tokenizer.eos_token_id]


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(make_engine, tokenizer):
    engine = make_engine()
    params = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    first = alone(engine, tokenizer, PROMPTS[0], "a", params)
    handles = [engine.submit(ids(tokenizer, p), m, GREEDY) for p, m in zip(PROMPTS, MODELS)]
    again = engine.submit(ids(tokenizer, PROMPTS[0]), "a", params).result(timeout=60)
    [h.result(timeout=60) for h in handles]
    assert again.token_ids == first.token_ids
    other = alone(engine, tokenizer, PROMPTS[0], "a",
                  SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=8))
    assert other.token_ids != first.token_ids


def test_a_tiny_top_p_keeps_only_the_most_likely_token(make_engine, tokenizer):
    engine = make_engine()
    nucleus = alone(engine, tokenizer, PROMPTS[2], "b",
                    SamplingParams(max_tokens=10, temperature=1.0, top_p=1e-6, seed=3))
    assert nucleus.token_ids == alone(engine, tokenizer, PROMPTS[2], "b").token_ids


def test_stop_strings_cut_the_text_and_max_tokens_ends_with_length(make_engine, tokenizer):
    engine = make_engine()
    full = alone(engine, tokenizer, PROMPTS[3], "c", SamplingParams(max_tokens=24, temperature=0))
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    text = full.text
    stop = text[6:8]
    cut = alone(engine, tokenizer, PROMPTS[3], "c",
                SamplingParams(max_tokens=24, temperature=0, stop=(stop, "never-seen")))
    assert cut.finish_reason == "stop"
    assert cut.text == text[:text.find(stop)]


def test_streamed_pieces_add_up_to_the_text(make_engine, tokenizer):
    engine = make_engine()
    handle = engine.submit(ids(tokenizer, PROMPTS[0]), "b",
                           SamplingParams(max_tokens=16, temperature=0, stop=("qq",)))
    events = list(handle.events(timeout=60))
    assert isinstance(events[-1], Finished)
    assert "".join(e.text for e in events if isinstance(e, Delta)) == events[-1].text


def test_limits_unknown_model_context_length_and_full_queue(make_engine, tokenizer):
    engine = make_engine(start=False, max_queue=2)
    with pytest.raises(UnknownModelError, match="GET /v1/models"):
        engine.submit([1, 2], "nope", GREEDY)
    with pytest.raises(ContextLengthError, match="context length of 96"):
        engine.submit([1] * 90, "a", GREEDY)
    engine.submit([1, 2], "a", GREEDY)
    engine.submit([1, 2], BASE, GREEDY)
    with pytest.raises(QueueFullError):
        engine.submit([1, 2], "b", GREEDY)


def test_the_lru_keeps_at_most_max_resident_idle_adapters(make_engine, tokenizer):
    engine = make_engine(max_resident=1)
    first = alone(engine, tokenizer, PROMPTS[0], "a")
    for name in ("b", "c", "a", "b"):
        alone(engine, tokenizer, PROMPTS[0], name)
        assert len(splice.list_adapters(engine.model)) <= 1
    assert alone(engine, tokenizer, PROMPTS[0], "a").token_ids == first.token_ids  # reloaded


def test_loading_an_adapter_does_not_stall_the_others(make_engine, tokenizer, monkeypatch):
    import splice.serving.residency as residency
    gate, reading = threading.Event(), threading.Event()
    real_read = residency.read_adapter_folder

    def slow_read(folder):
        reading.set()
        assert gate.wait(timeout=60)
        return real_read(folder)

    monkeypatch.setattr(residency, "read_adapter_folder", slow_read)
    engine = make_engine()
    waiting = engine.submit(ids(tokenizer, PROMPTS[0]), "a", GREEDY)
    assert reading.wait(timeout=30)
    # while "a" is being read, a base request runs start to finish
    base = engine.submit(ids(tokenizer, PROMPTS[1]), BASE, GREEDY).result(timeout=60)
    assert base.finish_reason in ("length", "stop") and not gate.is_set()
    gate.set()
    assert waiting.result(timeout=60).token_ids


def in_flight_swap(engine, tokenizer, action) -> tuple[Finished, Finished]:
    """Start a request on "a", run `action` after its first text, and return (its result, the
    result of the same request run alone before)."""
    before = alone(engine, tokenizer, PROMPTS[2], "a", SamplingParams(max_tokens=20, temperature=0))
    done = threading.Event()
    result = {}

    def on_event(event):
        if isinstance(event, Delta) and not done.is_set():
            done.set()
            action()
        if isinstance(event, Finished):
            result["finished"] = event

    engine.submit(ids(tokenizer, PROMPTS[2]), "a", SamplingParams(max_tokens=20, temperature=0),
                  on_event=on_event)
    for _ in range(600):
        if "finished" in result:
            break
        threading.Event().wait(0.05)
    assert done.is_set()
    return result["finished"], before


def test_a_hot_swap_in_flight_finishes_on_the_old_version(make_engine, tokenizer, library,
                                                          tmp_path):
    engine = make_engine()
    params = SamplingParams(max_tokens=20, temperature=0)
    add_to_library(engine, AdapterBody(name="d", path=str(tmp_path / "folders" / "d")))
    new = alone(engine, tokenizer, PROMPTS[2], "d", params)
    alone(engine, tokenizer, PROMPTS[2], "a", params)
    old_slots = set(splice.list_adapters(engine.model))         # a's and d's

    swap = AdapterBody(name="a", path=str(tmp_path / "folders" / "d"), replace=True)
    finished, before = in_flight_swap(engine, tokenizer, lambda: add_to_library(engine, swap))
    assert finished.token_ids == before.token_ids              # the version it started on
    after = alone(engine, tokenizer, PROMPTS[2], "a", params)
    assert after.token_ids == new.token_ids != before.token_ids  # new requests get the new one
    slots = set(splice.list_adapters(engine.model))
    assert len(old_slots - slots) == 1 and len(slots) == 2     # the old version was detached


def test_removing_an_adapter_in_flight_lets_its_requests_finish(make_engine, tokenizer, library):
    engine = make_engine()

    def remove():
        library.remove("a")
        engine.residency.refresh()
        engine.residency.retire("a")

    finished, before = in_flight_swap(engine, tokenizer, remove)
    assert finished.token_ids == before.token_ids
    with pytest.raises(UnknownModelError):
        engine.submit([1, 2], "a", GREEDY)
    alone(engine, tokenizer, PROMPTS[0], BASE)  # one more step runs the collection
    assert splice.list_adapters(engine.model) == {}

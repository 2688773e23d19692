"""The adapter-library demo end to end on a tiny chat model (SmolLM2's tokenizer, random
weights): three adapters trained, put in a library, answered in one mixed batch."""

import json

import pytest

import splice
from splice.core.attach import BASE_ADAPTER
from splice.demo import DEFAULT_PRESET
from splice.demo_library import (BEHAVIOURS, COMPOSED, as_key_value, parse_fields,
                                 run_library_demo, write_behaviour_data)
from splice.train.evaluate import greedy_completions


def test_fields_round_trip_through_the_key_value_format():
    line = "name=Ana María Lee; age=30; job=baker; city=São Paulo"
    assert as_key_value(parse_fields(line)) == line


def test_behaviour_data_answers_the_same_records_in_each_format(tmp_path):
    records = {}
    for behaviour in BEHAVIOURS:
        train, evals = write_behaviour_data(behaviour, tmp_path, eval_rows=5)
        rows = [json.loads(line) for line in train.read_text().splitlines()]
        records[behaviour] = [r["prompt"] for r in rows]
        assert len(evals.read_text().splitlines()) == 5
    assert records["keyvalue"] == records["json"] == records["shout"]
    first = json.loads(write_behaviour_data("json", tmp_path, 1)[1].read_text())
    assert set(json.loads(first["completion"])) == {"name", "age", "job", "city"}


@pytest.mark.integration
def test_library_demo_on_a_tiny_chat_model(tiny_chat_model, tmp_path):
    overrides = {"model": str(tiny_chat_model), "train.steps": 2, "train.lr": 5e-2,
                 "train.batch_size": 4, "train.save_every": 2}
    report = run_library_demo(DEFAULT_PRESET, overrides, output=tmp_path, eval_rows=3,
                              train_rows=16)

    library = splice.AdapterLibrary(tmp_path / "library")
    assert [e.name for e in library.list()] == sorted(BEHAVIOURS)
    assert [row.adapter for row in report.rows] == [BASE_ADAPTER, *BEHAVIOURS, COMPOSED]
    assert all(row.same_as_alone for row in report.rows)

    # The reference for each row: a fresh model with that adapter alone, active, no routing.
    for row in report.rows[1:4]:
        model, tokenizer = splice.load_model(tiny_chat_model)
        library.load_into(model, row.adapter)
        answer = greedy_completions(model, tokenizer, [report.prompt], max_new_tokens=48,
                                    progress=False)[0]
        assert answer == row.answer, row.adapter

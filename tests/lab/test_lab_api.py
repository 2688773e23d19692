"""The lab's JSON API: every number it serves equals what the library's functions compute."""

from __future__ import annotations

import json
import time

import pytest
import torch
from fastapi.testclient import TestClient

import splice
from splice.core.layer import adapter_layers
from splice.core.report import parameter_report
from splice.lab.app import create_app
from splice.lab.training import TOY_TASK, TrainSettings
from splice.plan import plan_all_methods, shape_from_model, shape_from_preset
from splice.train.batching import collate
from splice.train.data import load_jsonl

from lab_helpers import LIBRARY_ADAPTERS, TRAIN, reference_answer, tiny_base


@pytest.fixture
def client(app) -> TestClient:
    return TestClient(app)


# -- Rank --------------------------------------------------------------------------------------
@pytest.mark.parametrize("rank,targets", [(1, "q_proj"), (8, "q_proj,v_proj"), (64, "all-linear"),
                                          (256, "gate_proj,up_proj,down_proj")])
def test_rank_counts_equal_parameter_report_on_the_loaded_model(client, tokenizer, rank, targets):
    data = client.get(f"/api/rank?rank={rank}&targets={targets}").json()
    model = tiny_base(len(tokenizer))
    wanted = targets if targets == "all-linear" else tuple(targets.split(","))
    report = parameter_report(model, splice.LoRAConfig(rank=rank, target_modules=wanted))
    assert data["adapter_params"] == report.adapter_params
    assert data["model_params"] == report.model_params == sum(p.numel() for p in model.parameters())
    assert data["percent"] == pytest.approx(report.percent)
    assert data["adapter_bytes"] == 4 * report.adapter_params
    assert [(r["module_type"], r["modules"], r["adapter_params"], r["base_params"]) for r in data["rows"]] == [
        (r.module_type, r.modules, r.adapter_params, r.base_params) for r in report.rows]


def test_rank_example_is_the_4096_matrix_closed_form(client):
    for rank in (1, 8, 256):
        example = client.get(f"/api/rank?rank={rank}&targets=q_proj").json()["example"]
        assert example["lora_params"] == rank * (4096 + 4096)
        assert example["full_params"] == 4096 * 4096
    assert client.get("/api/rank?rank=8&targets=q_proj").json()["example"]["lora_params"] == 65_536


def test_rank_counts_ignore_adapters_the_other_panels_attached(client):
    before = client.get("/api/rank?rank=8&targets=q_proj,v_proj").json()
    client.post("/api/library/merge", json={"name": "formal"})
    assert client.get("/api/rank?rank=8&targets=q_proj,v_proj").json() == before


@pytest.mark.parametrize("query,words", [("rank=0&targets=q_proj", "1 to 256"),
                                         ("rank=257&targets=q_proj", "1 to 256"),
                                         ("rank=8&targets=nope", "choose 'all-linear'")])
def test_rank_refuses_bad_input_with_a_message(client, query, words):
    response = client.get(f"/api/rank?{query}")
    assert response.status_code == 400
    assert words in response.json()["error"]


# -- Memory ------------------------------------------------------------------------------------
def planned_parts(plan) -> dict:
    return {"weights": plan.frozen_weights + plan.trainable_weights, "gradients": plan.gradients,
            "optimizer": plan.optimizer_state, "activations": plan.activations}


@pytest.mark.parametrize("query,settings", [
    ({"model": "loaded", "rank": "8", "batch": "2", "seq": "64"},
     {"rank": 8, "batch": 2, "seq": 64}),
    ({"model": "7B", "rank": "16", "batch": "1", "seq": "512", "targets": "q_proj,v_proj",
      "dtype": "fp32", "optimizer": "adamw8bit", "grad_checkpointing": "true"},
     {"rank": 16, "batch": 1, "seq": 512, "targets": "q_proj,v_proj", "dtype": "fp32",
      "optimizer": "adamw8bit", "grad_checkpointing": True}),
    ({"model": "65B", "rank": "64", "batch": "4", "seq": "2048"},
     {"rank": 64, "batch": 4, "seq": 2048}),
])
def test_memory_bars_are_the_planners_numbers(client, tokenizer, query, settings):
    data = client.get("/api/memory", params=query).json()
    shape = (shape_from_model(tiny_base(len(tokenizer))) if query["model"] == "loaded"
             else shape_from_preset(query["model"], "llama"))
    plans = plan_all_methods(shape, **settings)
    assert [m["method"] for m in data["methods"]] == ["full", "lora", "qlora"]
    for row, plan in zip(data["methods"], plans):
        assert row["parts"] == planned_parts(plan)
        assert row["total"] == plan.total and row["sum"] == plan.sum_of_parts
        assert row["trainable_params"] == plan.trainable_params
    assert data["params"] == shape.params


def test_memory_plans_the_loaded_model_even_with_library_adapters_attached(client):
    client.post("/api/library/merge", json={"name": "formal"})
    assert client.get("/api/memory", params={"model": "loaded"}).status_code == 200


def test_memory_refuses_bad_input_with_a_message(client):
    response = client.get("/api/memory", params={"model": "3B"})
    assert response.status_code == 400 and "choose 'loaded' or one of 1B, 7B, 13B, 65B" in response.json()["error"]
    response = client.get("/api/memory", params={"model": "7B", "rank": "x"})
    assert response.status_code == 400 and "rank='x'" in response.json()["error"]


# -- Family ------------------------------------------------------------------------------------
def test_family_is_the_method_table(client):
    assert client.get("/api/family").json() == splice.method_table()


# -- Library -----------------------------------------------------------------------------------
def test_library_lists_the_entries(client, library_dir):
    entries = splice.AdapterLibrary(library_dir).list()
    data = client.get("/api/library").json()
    assert [(e["name"], e["method"], e["rank"], e["size_bytes"]) for e in data["entries"]] == [
        (e.name, e.method, e.rank, e.size_bytes) for e in entries]
    assert [e["name"] for e in data["entries"]] == sorted(LIBRARY_ADAPTERS)
    assert data["applied"]["kind"] == "none"


def test_merge_changes_the_answer_and_unmerge_brings_the_base_back(client, tokenizer, library_dir):
    base = reference_answer(tokenizer, library_dir, {})
    first = client.post("/api/library/answer", json={}).json()
    assert first["base"] == first["current"] == base

    state = client.post("/api/library/merge", json={"name": "formal"}).json()
    assert state["applied"] == {"kind": "merge", "names": ["formal"], "weights": [1.0]}
    merged = client.post("/api/library/answer", json={}).json()
    assert merged["base"] == base
    assert merged["current"] == reference_answer(tokenizer, library_dir, {"formal": 1.0})
    assert merged["current"] != base

    client.post("/api/library/merge", json={"name": "terse"})  # replaces formal
    other = client.post("/api/library/answer", json={}).json()
    assert other["current"] == reference_answer(tokenizer, library_dir, {"terse": 1.0})

    assert client.post("/api/library/unmerge").json()["applied"]["kind"] == "none"
    after = client.post("/api/library/answer", json={}).json()
    assert after["base"] == after["current"] == base


def test_blend_merges_the_weighted_sum_of_updates(client, app, tokenizer, library_dir, lab_model):
    weights = {"formal": 0.5, "terse": -0.7}
    original = {path: layer.base_layer.weight.detach().clone()
                for path, layer in adapter_layers(lab_model)}
    state = client.post("/api/library/blend", json={"names": list(weights),
                                                    "weights": list(weights.values())}).json()
    assert state["applied"] == {"kind": "blend", "names": list(weights), "weights": list(weights.values())}
    for path, layer in adapter_layers(lab_model):
        expected = original[path] + sum(w * layer.delta_weight(n) for n, w in weights.items())
        torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-6, rtol=1e-5)
    answer = client.post("/api/library/answer", json={}).json()
    assert answer["current"] == reference_answer(tokenizer, library_dir, weights)
    client.post("/api/library/unmerge")
    for path, layer in adapter_layers(lab_model):
        torch.testing.assert_close(layer.base_layer.weight, original[path], atol=1e-6, rtol=0)


def test_library_refuses_unknown_adapters_with_a_message(client):
    response = client.post("/api/library/merge", json={"name": "missing"})
    assert response.status_code == 400
    assert "no library adapter named 'missing'" in response.json()["error"]


# -- Train -------------------------------------------------------------------------------------
def read_events(client) -> tuple[list[dict], dict]:
    steps, end, kind = [], None, None
    with client.stream("GET", "/api/train/events") as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                if kind == "step":
                    steps.append(data)
                else:
                    end = data
    return steps, end


def test_training_streams_loss_and_delta_norms_from_exactly_zero(client, app, tokenizer):
    assert client.post("/api/train/play").json()["state"] == "running"
    events, end = read_events(client)
    assert end["state"] == "done"
    assert [e["step"] for e in events] == list(range(TRAIN.steps + 1))
    assert set(events[0]["norms"].values()) == {0.0}
    assert min(events[-1]["norms"].values()) > 0
    assert events[-1]["loss"] < events[0]["loss"]

    # Step 0's loss is the base model's on the toy batch (transformers' own loss as reference).
    batch = collate(load_jsonl(TOY_TASK, tokenizer, max_len=TRAIN.max_len).examples[:TRAIN.examples],
                    tokenizer.pad_token_id)
    with torch.no_grad():
        base_loss = tiny_base(len(tokenizer))(input_ids=batch.input_ids,
                                              attention_mask=batch.attention_mask,
                                              labels=batch.labels).loss
    assert events[0]["loss"] == pytest.approx(base_loss.item(), rel=1e-5)

    # The last norms are ‖s·B·A‖_F of the trained factors.
    trained = app.state.session.model
    for path, norm in events[-1]["norms"].items():
        layer = trained.get_submodule(path)
        a, b = layer.lora_A["lab"].weight, layer.lora_B["lab"].weight
        assert norm == pytest.approx(torch.linalg.matrix_norm(layer.scaling["lab"] * b @ a).item(), rel=1e-5)
    assert len(events[-1]["norms"]) == 2 * len(TRAIN.targets)


def test_a_second_play_starts_a_fresh_adapter(client):
    client.post("/api/train/play")
    first, _ = read_events(client)
    client.post("/api/train/play")
    second, _ = read_events(client)
    assert second[0]["run"] == first[0]["run"] + 1
    assert set(second[0]["norms"].values()) == {0.0}
    assert [e["loss"] for e in second] == pytest.approx([e["loss"] for e in first], rel=1e-5)


def test_pause_holds_the_run_and_stop_ends_it(lab_model, tokenizer, library_dir):
    long = TrainSettings(rank=4, targets=("q_proj",), steps=10_000, lr=1e-3, examples=2)
    client = TestClient(create_app(lab_model, tokenizer, library_dir, train_settings=long))
    client.post("/api/train/play")
    while client.get("/api/train/status").json()["step"] is None:
        time.sleep(0.01)
    assert client.post("/api/train/pause").json()["state"] == "paused"
    time.sleep(0.1)  # the step in flight finishes
    held = client.get("/api/train/status").json()["step"]
    time.sleep(0.3)
    assert client.get("/api/train/status").json()["step"] == held
    assert client.post("/api/train/play").json()["state"] == "running"
    while client.get("/api/train/status").json()["step"] == held:
        time.sleep(0.01)
    stopped = client.post("/api/train/stop").json()
    assert stopped["state"] == "stopped"
    assert stopped["step"] < long.steps
    events, end = read_events(client)
    assert end["state"] == "stopped" and len(events) == stopped["step"] + 1


def test_training_leaves_the_resident_model_alone(client, lab_model):
    before = {k: v.clone() for k, v in lab_model.state_dict().items()}
    client.post("/api/train/play")
    read_events(client)
    after = lab_model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)

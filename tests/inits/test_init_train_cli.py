"""`splice train --init ...` on a tiny chat model: every init trains, data-aware ones read the
training set, and the saved adapter reproduces the trained model's eval loss on the untouched
base."""

from __future__ import annotations

import json

import pytest

from splice.cli.main import main
from splice.config.train import AdapterSection, build_train_config
from splice.generation import load_for_inference
from splice.train.evaluate import evaluate_file
from splice.train.run import adapter_config, draw_init_batches

# Each run loads a tiny model with SmolLM2's 49k-token vocabulary and trains a few steps.
slow = pytest.mark.slow


@slow
# olora takes pissa's path (a data-free init that leaves a residual base)
@pytest.mark.parametrize("init,rank_on_file", [("pissa", 4), ("lora_ga", 4), ("eva", 2), ("loftq", 2)])
def test_train_with_each_init(init, rank_on_file, tiny_chat_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    # {text} lines: an eval loss without the (slow) greedy exact match
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps({"text": f"{a} plus {b} is {a + b}."}) + "\n"
                             for a, b in ((1, 2), (3, 4), (5, 0))))
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(tiny_data[0]),
                 "--eval-data", str(evals), "--init", init, "--init-batches", "2",
                 "--rank", "2", "--targets", "q_proj,v_proj,up_proj", "--steps", "3",
                 "--batch-size", "4", "--lr", "1e-2", "--output", str(out), "--no-progress"]) == 0
    record = json.loads((out / "training.json").read_text())
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == rank_on_file  # converted (2r) where the base held a residual
    if init == "eva":
        assert sum(saved.get("rank_pattern", {}).values()) or saved["r"] == 2
    if init == "loftq":
        return  # its adapter belongs with the quantized base deq(Q), not the original weights
    model, tokenizer = load_for_inference(str(tiny_chat_model), str(out))
    report = evaluate_file(model, tokenizer, evals, batch_size=4)
    assert report.eval_loss == pytest.approx(record["metrics"]["eval_loss"], abs=1e-4)


@slow
def test_qlora_with_loftq_puts_the_adapter_on_the_4bit_base(tiny_chat_model, tiny_data, tmp_path):
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(tiny_data[0]),
                 "--method", "qlora", "--init", "loftq", "--rank", "2", "--steps", "2",
                 "--batch-size", "4", "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["init_lora_weights"] == "loftq"


def test_init_options_reach_the_lora_config():
    config = build_train_config({"data": {"path": "x.jsonl"}, "adapter": {
        "init": "loftq", "init_options": {"loftq_bits": 8, "loftq_iterations": 2}}})
    lora = adapter_config(config.adapter)
    assert (lora.init, lora.init_options.loftq_bits, lora.init_options.loftq_iterations) == ("loftq", 8, 2)


def test_only_data_inits_draw_batches():
    config = build_train_config({"data": {"path": "x.jsonl"}, "adapter": {"init": "pissa"}})
    assert draw_init_batches(config, None, 0) == []
    assert AdapterSection(init="eva").init_batches == 4

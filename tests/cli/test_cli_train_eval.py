"""The command line end to end on a tiny model: train from a YAML preset with dotted overrides,
then eval, generate (merged and unmerged) and merge its output; bad input exits 2 with a message
that names the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import splice
from splice.cli import generate as generate_command
from splice.cli.main import main
from splice.generation import load_for_inference
from splice.train.evaluate import evaluate_file

pytestmark = pytest.mark.integration  # needs SmolLM2's tokenizer from the bundled package

PRESET = """\
# A tiny run for the tests:  splice train --config tiny.yaml train.lr=2e-2
model: {model}
output: {output}
data:
  path: {train}
  eval_path: {eval}
  max_len: 64
adapter:
  rank: 4
  dropout: 0.0
train:
  lr: 1.0e-3
  steps: 4
  batch_size: 4
  seed: 1
"""


@pytest.fixture(scope="module")
def preset(tiny_chat_model, tiny_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "tiny.yaml"
    path.write_text(PRESET.format(model=tiny_chat_model, output=folder / "run", train=tiny_data[0],
                                  eval=tiny_data[1]))
    return path


@pytest.fixture(scope="module")
def run_folder(preset) -> Path:
    """The output of `splice train --config tiny.yaml train.lr=2e-2 adapter.rank=2`."""
    assert main(["train", "--config", str(preset), "--no-progress", "train.lr=2e-2",
                 "adapter.rank=2"]) == 0
    return preset.parent / "run"


def test_train_takes_the_preset_and_its_overrides(run_folder):
    record = json.loads((run_folder / "training.json").read_text())
    assert record["config"]["train"]["lr"] == 2e-2  # override (the preset says 1e-3)
    assert record["config"]["adapter"]["rank"] == 2  # override (the preset says 4)
    assert record["config"]["train"]["steps"] == 4  # from the preset
    assert json.loads((run_folder / "adapter_config.json").read_text())["r"] == 2
    weights = load_file(run_folder / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def test_eval_prints_what_evaluate_file_returns(run_folder, tiny_chat_model, tiny_data, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_chat_model), "--adapter", str(run_folder),
                 "--data", str(tiny_data[1]), "--show", "2"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_for_inference(str(tiny_chat_model), str(run_folder))
    report = evaluate_file(model, tokenizer, tiny_data[1])
    assert report.examples == 6 and report.exact_match is not None
    assert f"eval loss:   {report.eval_loss:.4f}" in printed
    assert f"perplexity:  {report.perplexity:.2f}" in printed
    assert f"exact match: {100 * report.exact_match:.1f}%" in printed
    assert printed.count("reference:") == 2 and repr(report.references[0]) in printed
    # the same loss training measured at its end (batch size 4 there, 8 here: padding differs)
    record = json.loads((run_folder / "training.json").read_text())
    assert report.eval_loss == pytest.approx(record["metrics"]["eval_loss"], abs=1e-4)


def test_eval_without_prompt_completion_lines_has_no_exact_match(tiny_chat_model, tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "one two three"}) + "\n")
    assert main(["eval", "--model", str(tiny_chat_model), "--data", str(data)]) == 0
    assert "exact match: n/a" in capsys.readouterr().out


def test_generate_merged_and_unmerged_give_the_same_greedy_text(run_folder, tiny_chat_model, monkeypatch):
    replies = []
    real = generate_command.generate_reply

    def recording(*args, **kwargs):
        replies.append(real(*args, **kwargs))
        return replies[-1]

    monkeypatch.setattr(generate_command, "generate_reply", recording)
    common = ["generate", "--model", str(tiny_chat_model), "--adapter", str(run_folder),
              "--max-new-tokens", "12", "Add 2 and 3."]
    assert main(common) == 0
    assert main(common[:-1] + ["--merge", common[-1]]) == 0
    assert len(replies) == 2 and replies[0] and replies[0] == replies[1]


def test_merge_writes_a_folder_transformers_loads(run_folder, tiny_chat_model, tmp_path):
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_chat_model), "--adapter", str(run_folder),
                 "--output", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    base, _ = splice.load_model(str(tiny_chat_model))
    adapted, _ = splice.load_model(str(tiny_chat_model))
    splice.load_adapter(adapted, run_folder)
    ids = torch.randint(0, plain.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = adapted(ids).logits  # (2, 9, V)
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-5)
        assert (expected - base(ids).logits).abs().max() > 1e-2  # the adapter matters here


# bad input ------------------------------------------------------------------------------------

def test_an_unknown_override_key_exits_2_naming_it(preset, capsys):
    assert main(["train", "--config", str(preset), "train.learning_rate=1e-3"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err


@pytest.fixture
def bad_data(tiny_data, tmp_path) -> Path:
    """The training data with line 3 broken."""
    lines = tiny_data[0].read_text().splitlines(keepends=True)
    lines[2] = '{"prompt": "Add 1 and 1.", "completion": \n'
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(lines))
    return path


def test_a_malformed_data_line_exits_2_naming_file_and_line(preset, bad_data, tiny_chat_model, tmp_path,
                                                            capsys):
    assert main(["train", "--config", str(preset), "--data", str(bad_data),
                 "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    assert f"{bad_data}:3: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert main(["eval", "--model", str(tiny_chat_model), "--data", str(bad_data)]) == 2
    assert f"{bad_data}:3: not valid JSON" in capsys.readouterr().err


def test_skip_bad_trains_on_the_rest_and_counts_the_skipped_line(preset, bad_data, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--config", str(preset), "--data", str(bad_data), "--output", str(out),
                 "--skip-bad", "--no-progress", "train.steps=1", "data.eval_path=null"]) == 0
    assert "skipped 1 malformed line" in capsys.readouterr().err
    stats = json.loads((out / "training.json").read_text())["data_stats"]
    assert stats["skipped"] == 1 and stats["lines_read"] == 30

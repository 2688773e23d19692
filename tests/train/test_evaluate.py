"""Exact match, batched greedy generation, and the demo task generator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from splice.train.data import render_prompt
from splice.train.evaluate import exact_match, greedy_completions

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "make_demo_task.py"


# exact_match ---------------------------------------------------------------------------------

def test_exact_match_strips_outer_whitespace_only():
    predictions = [" a=1; b=2\n", "a=1;b=2", "A=1; b=2", "a=1; b=2"]
    references = ["a=1; b=2"] * 4
    # 1: outer whitespace ignored; 2: inner whitespace counts; 3: case counts; 4: exact.
    assert exact_match(predictions, references) == 0.5


def test_exact_match_strips_the_reference_too():
    assert exact_match(["x"], ["  x \t\n"]) == 1.0
    assert exact_match(["x", "y", "z"], ["x", "y", "q"]) == pytest.approx(2 / 3)


def test_exact_match_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        exact_match(["a", "b"], ["a"])


def test_exact_match_rejects_empty_input():
    with pytest.raises(ValueError, match="zero examples"):
        exact_match([], [])


# greedy_completions on SmolLM2 -----------------------------------------------------------------

PROMPTS = [
    "Hi",
    "What is the capital of France? Answer in one sentence.",
    "Rewrite as one line: name=<full name>; age=<age>; job=<job>; city=<city>\n"
    "Maria Lopez, 34, nurse from Valencia",
    "List three colours.",
]


@pytest.mark.integration
def test_prompt_rendering_is_a_user_turn_with_generation_prompt(smollm2):
    _, tokenizer = smollm2
    text = tokenizer.decode(render_prompt(tokenizer, "Hi"))
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.integration
def test_left_padded_batches_equal_one_at_a_time(smollm2):
    model, tokenizer = smollm2
    lengths = {len(render_prompt(tokenizer, p)) for p in PROMPTS}
    assert len(lengths) == len(PROMPTS), "the prompts must differ in length to exercise padding"
    batched = greedy_completions(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4,
                                 progress=False)
    single = [greedy_completions(model, tokenizer, [p], max_new_tokens=12, progress=False)[0]
              for p in PROMPTS]
    assert batched == single
    assert all(isinstance(c, str) and c == c.strip() and c for c in batched)
    assert "Paris" in batched[1]


@pytest.mark.integration
def test_greedy_completions_restores_training_mode(smollm2):
    model, tokenizer = smollm2
    model.train()
    try:
        greedy_completions(model, tokenizer, ["Hi"], max_new_tokens=2, progress=False)
        assert model.training
    finally:
        model.eval()


# the demo task generator ------------------------------------------------------------------------

def _generate(out: Path) -> None:
    subprocess.run([sys.executable, str(GENERATOR), "--out", str(out)], check=True,
                   capture_output=True)


def _read(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_demo_task_generator_is_deterministic(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _generate(first)
    _generate(second)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
        shipped = ROOT / "data" / "demo" / name
        if shipped.exists():
            assert shipped.read_bytes() == (first / name).read_bytes(), (
                f"data/demo/{name} is stale: run `python scripts/make_demo_task.py`")


def test_demo_task_splits_are_disjoint_and_well_formed(tmp_path):
    _generate(tmp_path)
    train, evaluation = _read(tmp_path / "train.jsonl"), _read(tmp_path / "eval.jsonl")
    assert len(evaluation) == 120
    assert 600 <= len(train) <= 1500
    for row in train + evaluation:
        assert set(row) == {"prompt", "completion"}
        assert row["completion"].startswith("name=") and "; city=" in row["completion"]
    train_prompts = {row["prompt"] for row in train}
    assert len(train_prompts) == len(train)
    assert not train_prompts & {row["prompt"] for row in evaluation}

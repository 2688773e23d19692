"""The main job, end to end on the bundled SmolLM2: `make demo` / `splice demo`.

Teach the base model an output format it lacks (data/demo: person records to one key=value
line), show base vs adapter answers side by side, the adapter's size against the model's, fold
the adapter in and check the merged model answers the same, and end with a summary table.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import yaml

from splice.tables import format_table
from splice.config.train import TrainConfig, build_train_config, set_dotted
from splice.core.io import load_adapter
from splice.core.merging import merge_adapter
from splice.models import load_model
from splice.train.data import read_prompt_completions
from splice.train.evaluate import completion_budget, exact_match, greedy_completions
from splice.train.run import run_training

DEFAULT_PRESET = Path("presets/demo.yaml")


@dataclasses.dataclass
class DemoReport:
    base_exact_match: float
    adapter_exact_match: float
    merged_agrees: float
    adapter_bytes: int
    model_bytes: int
    train_seconds: float
    trainable: int
    total: int
    output: Path


def load_demo_config(preset: Path, overrides: dict[str, Any]) -> TrainConfig:
    values = yaml.safe_load(preset.read_text())
    for key, value in overrides.items():
        set_dotted(values, key, value)
    return build_train_config(values)


def say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(preset: Path = DEFAULT_PRESET, overrides: dict[str, Any] | None = None,
             examples_to_show: int = 5) -> DemoReport:
    config = load_demo_config(preset, overrides or {})
    prompts, references = read_prompt_completions(config.data.eval_path)
    say(f"== 1/4 base model {config.model} on {len(prompts)} held-out examples")
    model, tokenizer = load_model(config.model)
    budget = completion_budget(tokenizer, references)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    base_answers = greedy_completions(model, tokenizer, prompts, max_new_tokens=budget)
    base_em = exact_match(base_answers, references)
    say(f"base exact match: {100 * base_em:.1f}%")
    say(f"\n== 2/4 training a LoRA adapter (rank {config.adapter.rank}, {config.adapter.targets or 'all-linear'}, "
        f"{config.train.steps} steps)")
    clear_previous_run(Path(config.output))
    result = run_training(config)
    say(f"\n== 3/4 the adapter on the same {len(prompts)} examples")
    adapter_answers = result.eval_predictions
    adapter_em = result.exact_match
    show_side_by_side(prompts, base_answers, adapter_answers, references, examples_to_show)
    say("\n== 4/4 loading the saved adapter, merging it into the weights and answering again")
    load_adapter(model, result.output)
    merge_adapter(model)
    merged_answers = greedy_completions(model, tokenizer, prompts, max_new_tokens=budget)
    agree = sum(a == b for a, b in zip(merged_answers, adapter_answers)) / len(prompts)
    report = DemoReport(base_em, adapter_em, agree, adapter_size(result.output), model_bytes,
                        result.elapsed_s, result.trainable, result.total, result.output)
    say("\n" + summary_table(report))
    return report


def clear_previous_run(output: Path) -> None:
    """The demo always trains afresh; earlier demo checkpoints would otherwise ask for --resume."""
    checkpoints = output / "checkpoints"
    if checkpoints.is_dir():
        shutil.rmtree(checkpoints)


def adapter_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("adapter_*"))


def shorten(text: str, width: int) -> str:
    text = text.replace("\n", " ⏎ ")
    return text if len(text) <= width else text[: width - 1] + "…"


def show_side_by_side(prompts, base_answers, adapter_answers, references, count: int) -> None:
    for i in range(min(count, len(prompts))):
        record = prompts[i].splitlines()[-1]
        say(f"\nrecord:   {record}")
        say(f"base:     {shorten(base_answers[i], 100)}  {'✓' if base_answers[i] == references[i] else '✗'}")
        say(f"adapter:  {shorten(adapter_answers[i], 100)}  {'✓' if adapter_answers[i] == references[i] else '✗'}")


def summary_table(r: DemoReport) -> str:
    rows = [
        ["held-out exact match, base model", f"{100 * r.base_exact_match:.1f}%"],
        ["held-out exact match, with adapter", f"{100 * r.adapter_exact_match:.1f}%"],
        ["merged model gives the same greedy answers", f"{100 * r.merged_agrees:.1f}% of examples"],
        ["trainable parameters", f"{r.trainable:,} of {r.total:,} ({100 * r.trainable / r.total:.2f}%)"],
        ["adapter on disk vs model weights (fp32)",
         f"{r.adapter_bytes / 1e6:.1f} MB vs {r.model_bytes / 1e6:.0f} MB ({r.model_bytes / r.adapter_bytes:.0f}x smaller)"],
        ["training time (2 CPU threads)", f"{r.train_seconds:.0f} s"],
        ["adapter folder", str(r.output)],
    ]
    return format_table(["demo summary", ""], rows)

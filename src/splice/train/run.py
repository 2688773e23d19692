"""One training run end to end: model, adapter, data, loop, and the output folder.

The output folder holds the adapter in peft's format (or, for full fine-tuning, a model folder),
`training.json` (config, data hashes, base-model fingerprint, final metrics), `metrics.jsonl`,
`loss_curve.png` and `checkpoints/`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from splice.config.base import AdapterConfig, parse_targets
from splice.config.lora import DATA_INITS
from splice.config.train import AdapterSection, TrainConfig
from splice.core.accounting import count_trainable
from splice.core.attach import attach
from splice.core.errors import SpliceError
from splice.core.registry import get_method
from splice.core.io import atomic_write, save_adapter
from splice.inits.data import attach_with_data
from splice.inits.loftq import quantize_adapted_bases
from splice.models import load_model, model_fingerprint
from splice.quant.surgery import quantize_model, quantized_layers
from splice.train.batching import Batch, length_bucketed_batches
from splice.train.checkpoint import list_checkpoints
from splice.train.data import TokenizedDataset, data_fingerprint, load_jsonl, read_prompt_completions
from splice.train.distributed import DistContext
from splice.train.evaluate import completion_budget, exact_match, greedy_completions
from splice.train.loop import evaluate_loss, new_state, resume_from, run_loop, seed_everything
from splice.train.metrics import plot_loss_curve


@dataclass
class TrainResult:
    output: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    exact_match: float | None
    trainable: int
    total: int
    elapsed_s: float
    eval_predictions: list[str] | None = None


def say(message: str, dist: DistContext | None = None) -> None:
    if dist is None or dist.is_main:
        print(message, file=sys.stderr, flush=True)


# AdapterSection field -> config field, where the names differ.
_RENAMED = {"targets": "target_modules"}
# Methods that adapt every linear layer unless told otherwise.
_ALL_LINEAR_BY_DEFAULT = ("lora", "dora")


def adapter_config(section: AdapterSection, tokenizer: Any = None) -> AdapterConfig:
    """The method's config from the section: each field the method's config has, when set."""
    spec = get_method("lora" if section.method == "qlora" else section.method)
    accepted = {f.name for f in dataclasses.fields(spec.config_cls)}
    values: dict[str, Any] = {}
    for f in dataclasses.fields(section):
        name = _RENAMED.get(f.name, f.name)
        value = getattr(section, f.name)
        if name in accepted and value is not None:
            values[name] = parse_targets(value) if name == "target_modules" else value
    if "target_modules" not in values and spec.name in _ALL_LINEAR_BY_DEFAULT:
        values["target_modules"] = "all-linear"
    if values.get("init") == "text" and "tokenizer_name_or_path" in accepted and tokenizer is not None:
        values["tokenizer_name_or_path"] = tokenizer.name_or_path
    return spec.config_cls(**values)


def prepare_model(model: nn.Module, config: TrainConfig, tokenizer: Any = None,
                  init_batches: Sequence[Batch] = ()) -> None:
    """Attach the adapter (or unfreeze everything for full fine-tuning). `init_batches` feed a
    data-aware LoRA init (eva, lora_ga)."""
    section = config.adapter
    if section.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        adapter = adapter_config(section, tokenizer)
        # An init that reads or rewrites W (pissa, olora, loftq, lora_ga) runs on the
        # full-precision model; a QLoRA base is quantized after it (LoftQ's base is then Q).
        init_first = section.method == "qlora" and section.init not in (None, "default", "gaussian")
        if section.method == "qlora" and not init_first and not quantized_layers(model):
            quantize_model(model, block_size=section.quant_block_size, double_quant=section.double_quant)
        if init_batches:
            attach_with_data(model, adapter, [batch_inputs(b) for b in init_batches])
        else:
            attach(model, adapter)
        if init_first and not quantized_layers(model):  # a 4-bit folder already is
            quantize_adapted_bases(model, block_size=section.quant_block_size,
                                   double_quant=section.double_quant)
    if config.train.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def batch_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "labels": batch.labels}


def draw_init_batches(config: TrainConfig, data: TokenizedDataset, pad_id: int) -> list[Batch]:
    """The first training batches of the run, for a data-aware init (none for other inits)."""
    init = config.adapter.init
    if config.adapter.method not in ("lora", "qlora", "dora") or init not in DATA_INITS:
        return []
    batches = length_bucketed_batches(data.examples, config.train.batch_size,
                                      seed=config.train.seed, epoch=0, pad_token_id=pad_id)
    return batches[:config.adapter.init_batches]


def load_data(path: str, tokenizer: Any, config: TrainConfig, dist: DistContext) -> TokenizedDataset:
    data = load_jsonl(path, tokenizer, max_len=config.data.max_len, skip_bad=config.data.skip_bad)
    stats = data.stats
    if stats.skipped:
        say(f"warning: {path}: skipped {stats.skipped} malformed line(s) (--skip-bad)", dist)
    if stats.truncated:
        say(f"warning: {path}: {stats.truncated} example(s) truncated to --max-len {config.data.max_len}", dist)
    return data


def run_training(config: TrainConfig, *, resume: bool = False, show_progress: bool = True,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train as `config` says; `on_step` sees each step's metrics record (see LoopState.on_step)."""
    dist = DistContext.from_env()
    try:
        return _run(config, resume, show_progress, dist, on_step)
    finally:
        dist.close()


def _run(config: TrainConfig, resume: bool, show_progress: bool, dist: DistContext,
         on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    out = Path(config.output)
    if list_checkpoints(out / "checkpoints") and not resume:
        raise SpliceError(f"{out} already holds checkpoints of a run; pass --resume to continue it, "
                          "or choose another --output")
    seed_everything(config.train.seed)
    model, tokenizer = load_model(config.model)
    fingerprint = model_fingerprint(model)
    train_data = load_data(config.data.path, tokenizer, config, dist)
    eval_data = load_data(config.data.eval_path, tokenizer, config, dist) if config.data.eval_path else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prepare_model(model, config, tokenizer, draw_init_batches(config, train_data, pad_id))
    num_batches = len(length_bucketed_batches(train_data.examples, config.train.batch_size,
                                              seed=config.train.seed, epoch=0, pad_token_id=pad_id))
    state = new_state(model, config, num_batches, dist)
    state.on_step = on_step
    if resume:
        path = resume_from(out, state)
        say(f"resuming from {path} (step {state.progress.step})" if path else
            "no checkpoint to resume from; starting fresh", dist)
    counts = count_trainable(model)
    say(f"{config.adapter.method}: {counts}; {len(train_data)} examples, {state.total_steps} steps", dist)
    start = time.perf_counter()
    run_loop(state, train_data.examples, eval_data.examples if eval_data else None, config, pad_id,
             out, dist, show_progress)
    elapsed = time.perf_counter() - start
    eval_loss = evaluate_loss(model, eval_data.examples, batch_size=config.train.batch_size,
                              pad_id=pad_id, chunk_size=config.train.loss_chunk) if eval_data else None
    em, predictions = measure_exact_match(model, tokenizer, config) if dist.is_main else (None, None)
    result = TrainResult(out, state.progress.step, state.last_loss, eval_loss, em,
                         counts.trainable, counts.total, elapsed, predictions)
    if dist.is_main:
        write_outputs(model, tokenizer, config, result, fingerprint, train_data, eval_data)
    return result


def measure_exact_match(model: nn.Module, tokenizer: Any,
                        config: TrainConfig) -> tuple[float | None, list[str] | None]:
    """Greedy exact match on prompt/completion eval data, and the predictions (None for other shapes)."""
    if not config.data.eval_path:
        return None, None
    prompts, references = read_prompt_completions(config.data.eval_path)
    if not prompts:
        return None, None
    predictions = greedy_completions(model, tokenizer, prompts,
                                     max_new_tokens=completion_budget(tokenizer, references))
    return exact_match(predictions, references), predictions



def base_quantization(config: TrainConfig) -> dict[str, Any] | None:
    """How the frozen base was quantized during training (what a merge must reproduce)."""
    if config.adapter.method != "qlora":
        return None
    return {"quant_type": "nf4", "block_size": config.adapter.quant_block_size,
            "double_quant": config.adapter.double_quant}


def write_outputs(model: nn.Module, tokenizer: Any, config: TrainConfig, result: TrainResult,
                  fingerprint: str, train_data: TokenizedDataset, eval_data: TokenizedDataset | None) -> None:
    out = result.output
    out.mkdir(parents=True, exist_ok=True)
    if config.adapter.method == "full":
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    else:
        save_adapter(model, out)
    record = {
        "config": config.to_dict(),
        "data_sha256": data_fingerprint(config.data.path),
        "eval_data_sha256": data_fingerprint(config.data.eval_path) if config.data.eval_path else None,
        "base_model_fingerprint": fingerprint,
        "base_quantization": base_quantization(config),
        "data_stats": asdict(train_data.stats),
        "metrics": {"steps": result.steps, "final_train_loss": result.final_loss,
                    "eval_loss": result.eval_loss, "exact_match": result.exact_match,
                    "trainable_params": result.trainable, "total_params": result.total,
                    "train_seconds": round(result.elapsed_s, 2)},
        "torch": torch.__version__,
    }
    text = json.dumps(record, indent=2) + "\n"
    atomic_write(out / "training.json", lambda tmp: Path(tmp).write_text(text))
    if (out / "metrics.jsonl").exists():
        plot_loss_curve(out / "metrics.jsonl", out / "loss_curve.png",
                        title=f"{config.model} · {config.adapter.method}")

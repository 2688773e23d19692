"""The training loop behind `splice train`: LoRA or full fine-tuning, one process or DDP.

AdamW over the trainable parameters only, linear warm-up + cosine decay, gradient clipping, the
chunked output-head loss, length-bucketed batches, atomic checkpoints with exact resume, a stop
with a clear error on a non-finite loss (before the bad update touches the weights), and a
checkpoint on Ctrl-C.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from splice.config.train import TrainConfig
from splice.core.errors import SpliceError
from splice.optim.factory import make_optimizer as build_optimizer
from splice.train.batching import Batch, length_bucketed_batches, plain_batches
from splice.train.checkpoint import Progress, list_checkpoints, load_checkpoint, save_checkpoint
from splice.train.distributed import DistContext
from splice.train.loss import causal_lm_loss
from splice.train.metrics import MetricsLog
from splice.train.schedule import make_scheduler


class TrainingDiverged(SpliceError, FloatingPointError):
    """The loss or gradient became NaN/inf; the weights were not updated with it."""


class TrainingInterrupted(SpliceError, KeyboardInterrupt):
    """Ctrl-C: a checkpoint was written first."""


class LossModule(nn.Module):
    """The model plus its chunked loss as one forward, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module, chunk_size: int) -> None:
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: Batch) -> torch.Tensor:
        return causal_lm_loss(self.model, batch.input_ids, batch.attention_mask, batch.labels,
                              chunk_size=self.chunk_size)


@dataclass
class LoopState:
    model: nn.Module
    loss_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    progress: Progress
    total_steps: int
    last_loss: float = float("nan")
    last_eval_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    # Called with each step's record (eval_loss included when evaluated) once the step is done:
    # how a caller watches a run (a sweep prunes from it); what it raises ends the run.
    on_step: Callable[[dict[str, Any]], None] | None = None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SpliceError("nothing to train: no parameter requires grad (attach an adapter first)")
    return build_optimizer(config.train.optimizer, params, lr=config.train.lr,
                           weight_decay=config.train.weight_decay)


def count_steps(num_batches: int, config: TrainConfig, world: int = 1) -> int:
    steps_per_epoch = math.ceil(num_batches / (config.train.grad_accum * world))
    return config.train.steps or max(1, math.ceil(config.train.epochs * steps_per_epoch))


def epoch_groups(examples: list, config: TrainConfig, epoch: int, pad_id: int,
                 dist: DistContext) -> list[list[Batch]]:
    """The optimizer steps of one epoch: each a list of this rank's micro-batches."""
    per_step = config.train.grad_accum * dist.world_size
    batches = length_bucketed_batches(examples, config.train.batch_size, seed=config.train.seed,
                                      epoch=epoch, pad_token_id=pad_id)
    steps = [batches[i:i + per_step] for i in range(0, len(batches), per_step)]
    return [group[dist.rank::dist.world_size] for group in steps if len(group) == per_step]


def run_loop(state: LoopState, examples: list, eval_examples: list | None, config: TrainConfig,
             pad_id: int, out: Path, dist: DistContext, show_progress: bool = True) -> LoopState:
    # Only rank 0 touches the output folder (opening a MetricsLog rewrites metrics.jsonl).
    metrics = MetricsLog(out / "metrics.jsonl", state.progress.step) if dist.is_main else None
    bar = tqdm(total=state.total_steps, initial=state.progress.step, disable=not (show_progress and dist.is_main),
               desc="train", unit="step", dynamic_ncols=True)
    start, tokens_at_start = time.perf_counter(), state.progress.tokens_seen
    try:
        while state.progress.step < state.total_steps:
            groups = epoch_groups(examples, config, state.progress.epoch, pad_id, dist)
            for group in groups[state.progress.batch_in_epoch:]:
                record = train_step(state, group, config, dist)
                state.progress.batch_in_epoch += 1
                elapsed = time.perf_counter() - start
                record["tokens_per_s"] = (state.progress.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                after_step(state, record, metrics, eval_examples, config, pad_id, out, dist)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if state.progress.step >= state.total_steps:
                    break
            else:
                state.progress.epoch += 1
                state.progress.batch_in_epoch = 0
    except KeyboardInterrupt:
        if dist.is_main:
            path = save_checkpoint(out / "checkpoints", state.model, state.optimizer, state.scheduler,
                                   state.progress, config.train.keep_last)
            raise TrainingInterrupted(f"interrupted at step {state.progress.step}; checkpoint saved "
                                      f"to {path}; continue with --resume") from None
        raise
    finally:
        bar.close()
    return state


def after_step(state: LoopState, record: dict[str, Any], metrics: MetricsLog | None, eval_examples: list | None,
               config: TrainConfig, pad_id: int, out: Path, dist: DistContext) -> None:
    step = state.progress.step
    if config.train.eval_every and eval_examples and step % config.train.eval_every == 0:
        record["eval_loss"] = state.last_eval_loss = evaluate_loss(
            state.model, eval_examples, batch_size=config.train.batch_size, pad_id=pad_id,
            chunk_size=config.train.loss_chunk)
    if metrics is not None and (step % config.train.log_every == 0 or "eval_loss" in record):
        metrics.write(record)
    state.history.append(record)
    if config.train.save_every and step % config.train.save_every == 0 and dist.is_main:
        save_checkpoint(out / "checkpoints", state.model, state.optimizer, state.scheduler,
                        state.progress, config.train.keep_last)
    if state.on_step is not None:
        state.on_step(record)


def train_step(state: LoopState, group: list[Batch], config: TrainConfig, dist: DistContext) -> dict[str, Any]:
    """One optimizer step over this rank's micro-batches; the loss is the token mean over all ranks."""
    model, optimizer = state.model, state.optimizer
    model.train()
    local_tokens = sum(int(b.num_supervised) for b in group)
    total_tokens = dist.sum(local_tokens)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for i, batch in enumerate(group):
        with dist.no_sync_unless(state.loss_module, last=i == len(group) - 1):
            loss = state.loss_module(batch)
            # DDP averages gradients over ranks, so scale by world size to get the global token mean.
            (loss * batch.num_supervised * dist.world_size / max(total_tokens, 1)).backward()
        loss_sum += loss.item() * int(batch.num_supervised)
    mean_loss = dist.sum(loss_sum) / max(total_tokens, 1)
    step = state.progress.step + 1
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(divergence_message("loss", mean_loss, step, config))
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = config.train.max_grad_norm or float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(grad_norm):
        raise TrainingDiverged(divergence_message("gradient norm", grad_norm, step, config))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    state.scheduler.step()
    state.progress.step = step
    state.progress.tokens_seen += dist.sum(sum(int(b.num_tokens) for b in group))
    state.last_loss = mean_loss
    return {"step": step, "epoch": state.progress.epoch, "loss": mean_loss, "lr": lr, "grad_norm": grad_norm}


def divergence_message(what: str, value: float, step: int, config: TrainConfig) -> str:
    return (f"the {what} became {value} at step {step}; the weights were not updated with it and the "
            f"last good checkpoint (if any) is in {config.output}/checkpoints. Lower train.lr "
            f"(now {config.train.lr}) or keep train.max_grad_norm > 0, then resume with --resume")


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list, *, batch_size: int, pad_id: int,
                  chunk_size: int = 1024) -> float:
    """Token-mean cross-entropy over held-out examples."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in plain_batches(examples, batch_size, pad_token_id=pad_id):
        loss = causal_lm_loss(model, batch.input_ids, batch.attention_mask, batch.labels,
                              chunk_size=chunk_size)
        total += loss.item() * int(batch.num_supervised)
        tokens += int(batch.num_supervised)
    model.train(was_training)
    return total / max(tokens, 1)


def resume_from(out: Path, state: LoopState) -> Path | None:
    """Load the newest checkpoint under `out`, if there is one."""
    checkpoints = list_checkpoints(out / "checkpoints")
    if not checkpoints:
        return None
    state.progress = load_checkpoint(checkpoints[-1], state.model, state.optimizer, state.scheduler)
    return checkpoints[-1]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def new_state(model: nn.Module, config: TrainConfig, num_batches: int, dist: DistContext) -> LoopState:
    optimizer = make_optimizer(model, config)
    total = count_steps(num_batches, config, dist.world_size)
    scheduler = make_scheduler(optimizer, total, config.train.warmup_ratio)
    loss_module = dist.wrap(LossModule(model, config.train.loss_chunk))
    return LoopState(model, loss_module, optimizer, scheduler, Progress(), total)

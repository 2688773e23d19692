"""`splice train`: fine-tune a model with LoRA (or in full, the baseline) on JSONL data."""

from __future__ import annotations

import argparse
import os
import sys

from splice.config.base import help_for
from splice.config.train import (AdapterSection, DataSection, TrainConfig, TrainSection,
                                 build_train_config, parse_overrides, read_preset, set_dotted)
from splice.train.run import run_training

NAME = "train"
HELP = "fine-tune a model with LoRA (or in full) on JSONL data"
DESCRIPTION = ("Train an adapter on JSONL data ({messages}, {prompt, completion} or {text} lines). "
               "Writes the adapter in peft's format, training.json, metrics.jsonl, loss_curve.png "
               "and checkpoints to --output. LoRA alpha defaults to 2 x rank.")
EPILOG = """examples:
  splice train --model smollm2-135m --data data/demo/train.jsonl --eval-data data/demo/eval.jsonl \\
      --rank 16 --lr 2e-3 --steps 200 --output runs/demo
  splice train --config presets/demo.yaml train.lr=1e-3 adapter.rank=8
  splice train --config presets/demo.yaml --init eva --init-batches 4   # data-aware LoRA init
  torchrun --nproc_per_node 2 -m splice train --config presets/demo.yaml   # data parallel"""

# flag -> (dotted config key, section class, field) ; the help text comes from the config field
FLAGS: dict[str, tuple[str, type | None, str]] = {
    "--model": ("model", TrainConfig, "model"),
    "--output": ("output", TrainConfig, "output"),
    "--data": ("data.path", DataSection, "path"),
    "--eval-data": ("data.eval_path", DataSection, "eval_path"),
    "--max-len": ("data.max_len", DataSection, "max_len"),
    "--method": ("adapter.method", AdapterSection, "method"),
    "--rank": ("adapter.rank", AdapterSection, "rank"),
    "--alpha": ("adapter.alpha", AdapterSection, "alpha"),
    "--dropout": ("adapter.dropout", AdapterSection, "dropout"),
    "--targets": ("adapter.targets", AdapterSection, "targets"),
    "--init": ("adapter.init", AdapterSection, "init"),
    "--init-batches": ("adapter.init_batches", AdapterSection, "init_batches"),
    "--lr": ("train.lr", TrainSection, "lr"),
    "--epochs": ("train.epochs", TrainSection, "epochs"),
    "--steps": ("train.steps", TrainSection, "steps"),
    "--batch-size": ("train.batch_size", TrainSection, "batch_size"),
    "--grad-accum": ("train.grad_accum", TrainSection, "grad_accum"),
    "--seed": ("train.seed", TrainSection, "seed"),
    "--optimizer": ("train.optimizer", TrainSection, "optimizer"),
    "--save-every": ("train.save_every", TrainSection, "save_every"),
    "--eval-every": ("train.eval_every", TrainSection, "eval_every"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML preset (sections: model, output, data, adapter, train)")
    for flag, (dotted, cls, name) in FLAGS.items():
        parser.add_argument(flag, dest=dotted, default=None, help=help_for(cls, name))
    parser.add_argument("--skip-bad", dest="data.skip_bad", action="store_const", const="true",
                        default=None, help=help_for(DataSection, "skip_bad"))
    parser.add_argument("--grad-checkpointing", dest="train.grad_checkpointing", action="store_const",
                        const="true", default=None, help=help_for(TrainSection, "grad_checkpointing"))
    parser.add_argument("--rslora", dest="adapter.use_rslora", action="store_const", const="true",
                        default=None, help=help_for(AdapterSection, "use_rslora"))
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. train.lr=2e-4 adapter.rank=16")


def collect_config(args: argparse.Namespace) -> TrainConfig:
    values = read_preset(args.config)
    flag_keys = {dotted for dotted, _, _ in FLAGS.values()} | {
        "data.skip_bad", "train.grad_checkpointing", "adapter.use_rslora"}
    for dotted in flag_keys:
        if getattr(args, dotted) is not None:
            set_dotted(values, dotted, getattr(args, dotted))
    for key, value in parse_overrides(args.overrides).items():
        set_dotted(values, key, value)
    return build_train_config(values)


def run(args: argparse.Namespace) -> int:
    config = collect_config(args)
    result = run_training(config, resume=args.resume, show_progress=not args.no_progress)
    summary = (f"done: {result.steps} steps in {result.elapsed_s:.0f} s; train loss {result.final_loss:.4f}"
               + (f"; eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else "")
               + (f"; exact match {100 * result.exact_match:.1f}%" if result.exact_match is not None else "")
               + f"\noutput: {result.output}")
    if os.environ.get("RANK", "0") == "0":  # one summary under torchrun
        print(summary, file=sys.stderr)
    return 0

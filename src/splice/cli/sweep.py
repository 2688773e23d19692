"""`splice sweep`: search splice's knobs with Optuna; a killed sweep resumes where it stopped."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import optuna

from splice.config.base import ConfigError, help_for
from splice.config.train import parse_overrides, read_preset, set_dotted
from splice.sweep.report import summary, write_report
from splice.sweep.space import KNOBS, load_space
from splice.sweep.study import SweepRun, run_sweep

NAME = "sweep"
HELP = "search ranks, alphas, targets, learning rates, inits and methods with Optuna"
DESCRIPTION = (
    "Train one adapter per trial, each in its own process, on the knobs a YAML space file names ("
    + ", ".join(KNOBS) + "), with Optuna's TPE, random or grid sampler, and stop hopeless trials "
    "early from their intermediate eval loss (median pruning). The study's storage (SQLite in "
    "--output unless --storage names a database) records every trial, so rerunning the same "
    "command resumes a killed sweep and several processes or machines can share one. Writes "
    "results.csv, results.md, rank.png, importance.png and best/ (the best adapter) to "
    "--output, and prints the `splice train` command that reproduces the winner.")
EPILOG = """examples:
  splice sweep --config presets/demo.yaml --space sweeps/demo.yaml --trials 12 --steps 25 \\
      --output runs/sweep-demo
  splice sweep --model smollm2-135m --data data/demo/train.jsonl --eval-data data/demo/eval.jsonl \\
      --space sweeps/demo.yaml --trials 40 --steps 60 --workers 2 --output runs/sweep40
  splice sweep ... --storage postgresql://db-host/sweeps --study demo   # on several machines"""

# flag -> dotted training key; the base values every trial starts from
TRAIN_FLAGS = {"--model": "model", "--data": "data.path", "--eval-data": "data.eval_path",
               "--steps": "train.steps"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--space", required=True, help="the YAML search space (see sweeps/demo.yaml)")
    parser.add_argument("--output", required=True, help=help_for(SweepRun, "output"))
    parser.add_argument("--trials", type=int, default=12, help=help_for(SweepRun, "trials"))
    parser.add_argument("--config", help="a `splice train` YAML preset every trial starts from")
    for flag, dotted in TRAIN_FLAGS.items():
        parser.add_argument(flag, dest=dotted, default=None,
                            help=f"the trials' {dotted} (overrides --config)")
    parser.add_argument("--workers", type=int, default=1, help=help_for(SweepRun, "workers"))
    parser.add_argument("--storage", default=None, help=help_for(SweepRun, "storage"))
    parser.add_argument("--study", default="sweep", help=help_for(SweepRun, "study_name"))
    parser.add_argument("--keep-all", action="store_true", help=help_for(SweepRun, "keep_all"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the base training config, e.g. train.batch_size=4")


def base_values(args: argparse.Namespace) -> dict[str, Any]:
    """The training values every trial starts from: preset, then flags, then overrides."""
    values = read_preset(args.config)
    for dotted in TRAIN_FLAGS.values():
        if getattr(args, dotted) is not None:
            set_dotted(values, dotted, getattr(args, dotted))
    for key, value in parse_overrides(args.overrides).items():
        set_dotted(values, key, value)
    if not values.get("data", {}).get("eval_path"):
        raise ConfigError("a sweep minimises the eval loss: give held-out data with --eval-data "
                          "(or data.eval_path in --config)")
    return values


def run(args: argparse.Namespace) -> int:
    space = load_space(args.space)
    sweep = SweepRun(args.output, args.trials, args.workers, args.storage, args.study, args.keep_all)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line per trial comes from the sweep
    study = run_sweep(sweep, space, base_values(args))
    print(summary(write_report(study, Path(args.output))))
    return 0

"""`splice compose`: combine LoRA adapters (weighted, optionally pruned) into one new adapter."""

from __future__ import annotations

import argparse

from splice.config.base import help_for
from splice.merge.compose_config import METHODS, CompositionConfig
from splice.merge.compose_model import CompositionReport, compose_folders
from splice.tables import format_table

NAME = "compose"
HELP = "combine LoRA adapters into one (linear, cat, svd, ties, dare, magnitude prune)"
DESCRIPTION = ("Load the base model and each LoRA adapter folder, combine their updates "
               "ΔWᵢ = sᵢ·Bᵢ·Aᵢ module by module with the given weights (negative to subtract a "
               "behaviour), and save the result as a new LoRA adapter in peft's adapter format. "
               "'linear' and 'cat' are exact (rank Σrᵢ); svd, ties, dare_* and magnitude_prune "
               "are truncated to --rank by SVD, and the table reports what truncation lost, per "
               "module, relative to the composed update's norm.")
EPILOG = """examples:
  splice compose --model smollm2-135m --adapters runs/a,runs/b --weights 1,1 --output runs/a+b
  splice compose --model smollm2-135m --adapters runs/a,runs/b --weights 1,-0.5 \\
      --method ties --density 0.5 --output runs/a-minus-b
  splice compose --model smollm2-135m --adapters runs/a,runs/b --method svd --rank 8 \\
      --output runs/ab8
A first weight below zero needs '=': --weights=-1,1"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="the base model the adapters were trained on")
    parser.add_argument("--adapters", required=True, type=_folders,
                        help="comma-separated LoRA adapter folders")
    parser.add_argument("--weights", type=_numbers, default=None,
                        help=help_for(CompositionConfig, "weights") + " Default: 1 for each.")
    parser.add_argument("--method", choices=METHODS, default="linear",
                        help=help_for(CompositionConfig, "method"))
    parser.add_argument("--density", type=float, default=None,
                        help=help_for(CompositionConfig, "density"))
    parser.add_argument("--rank", type=int, default=None, help=help_for(CompositionConfig, "rank"))
    parser.add_argument("--majority-sign", choices=("total", "frequency"), default="total",
                        help=help_for(CompositionConfig, "majority_sign"))
    parser.add_argument("--seed", type=int, default=0, help=help_for(CompositionConfig, "seed"))
    parser.add_argument("--output", required=True, help="a new folder for the composed adapter")


def run(args: argparse.Namespace) -> int:
    weights = args.weights if args.weights is not None else [1.0] * len(args.adapters)
    config = CompositionConfig(tuple(weights), args.method, args.density, args.rank,
                               args.majority_sign, args.seed)
    report = compose_folders(args.model, args.adapters, args.output, config)
    print(summary(report))
    return 0


def summary(report: CompositionReport) -> str:
    rows = [[m.path, m.rank, f"{m.error:.3%}"] for m in report.modules]
    table = format_table(["module", "rank", "truncation error"], rows, [False, True, True])
    config = report.config
    how = config.method + (f" (density {config.density:g})" if config.density is not None else "")
    return (f"{table}\n\ncomposed {len(config.weights)} adapters with {how}, weights "
            f"{', '.join(f'{w:g}' for w in config.weights)}: truncation error {report.error:.3%} "
            f"of ‖ΔW‖ over all modules (worst module {report.max_error:.3%})\n"
            f"adapter written to {report.output}")


def _folders(text: str) -> list[str]:
    folders = [t.strip() for t in text.split(",") if t.strip()]
    if not folders:
        raise argparse.ArgumentTypeError("give at least one adapter folder")
    return folders


def _numbers(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 1,-0.5") \
            from None

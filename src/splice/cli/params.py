"""`splice params`: how many parameters an adapter trains, per module type and in total."""

from __future__ import annotations

import argparse
import re

from torch import nn

from splice.tables import format_table
from splice.config.base import ConfigError, help_for, parse_targets
from splice.config.lora import LoRAConfig
from splice.core.report import ParameterReport, parameter_report
from splice.models import load_model

NAME = "params"
HELP = "count the parameters a LoRA adapter trains"
DESCRIPTION = ("Count the parameters a LoRA adapter of a given rank trains on a model (per module "
               "type, and against the full model), or on a single weight matrix of a given shape.")
EPILOG = """examples:
  splice params --model smollm2-135m --rank 8 --targets all-linear
  splice params --shape 4096x4096 --rank 8"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a bundled model name (smollm2-135m, minilm-l6) or a local folder")
    source.add_argument("--shape", help="a single matrix, OUTxIN (e.g. 4096x4096)")
    parser.add_argument("--rank", type=int, default=8, help=help_for(LoRAConfig, "rank"))
    parser.add_argument("--targets", default="all-linear",
                        help=help_for(LoRAConfig, "target_modules") + " Comma-separate a list.")
    parser.add_argument("--bytes-per-param", type=int, default=4,
                        help="bytes per stored adapter parameter for the size column (4 = fp32, 2 = bf16)")


def parse_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise ConfigError(f"--shape {text!r}: write it as OUTxIN, e.g. 4096x4096")
    return int(match.group(1)), int(match.group(2))


def run(args: argparse.Namespace) -> int:
    if args.shape:
        out_features, in_features = parse_shape(args.shape)
        matrix = nn.Sequential(nn.Linear(in_features, out_features, bias=False, device="meta"))
        report = parameter_report(matrix, LoRAConfig(rank=args.rank, target_modules="all-linear"))
        print(shape_summary(report, out_features, in_features, args.rank))
        return 0
    model, _ = load_model(args.model)
    report = parameter_report(model, LoRAConfig(rank=args.rank, target_modules=parse_targets(args.targets)))
    print(model_summary(report, args.model, args.rank, args.bytes_per_param))
    return 0


def shape_summary(report: ParameterReport, out_features: int, in_features: int, rank: int) -> str:
    full = out_features * in_features
    lora = report.adapter_params
    return (f"{out_features}x{in_features} weight, LoRA rank {rank}: A ({rank}x{in_features}) + "
            f"B ({out_features}x{rank})\n"
            f"LoRA trains {lora:,} vs {full:,} for the full matrix ({full / lora:,.0f}x fewer, "
            f"{100 * lora / full:.3f}%)")


def model_summary(report: ParameterReport, model_name: str, rank: int, bytes_per_param: int) -> str:
    rows = [[r.module_type, r.modules, f"{r.adapter_params:,}", f"{r.base_params:,}",
             f"{100 * r.adapter_params / r.base_params:.2f}%"] for r in report.rows]
    rows.append(["total", sum(r.modules for r in report.rows), f"{report.adapter_params:,}",
                 f"{sum(r.base_params for r in report.rows):,}", ""])
    table = format_table(["module", "count", "LoRA params", "base params", "LoRA/base"], rows,
                         [False, True, True, True, True])
    size_mb = report.adapter_params * bytes_per_param / 1e6
    return (f"{model_name}, LoRA rank {rank}\n{table}\n\n"
            f"trainable: {report.adapter_params:,} of {report.model_params:,} parameters in the full "
            f"model ({report.percent:.3f}%); adapter file ≈ {size_mb:.2f} MB at "
            f"{bytes_per_param} bytes/param")

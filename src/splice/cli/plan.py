"""`splice plan`: the memory a fine-tuning run needs, per method, from the model's shape."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Sequence

from splice.config.base import help_for
from splice.plan.chart import plot_plans
from splice.plan.estimate import METHODS, OPTIMIZERS, MemoryPlan, PlanSettings, plan_memory
from splice.plan.examples import GPU_48GB, example_plans
from splice.plan.shapes import ARCHES, ModelShape, shape_from_name, shape_from_preset
from splice.tables import format_table

NAME = "plan"
HELP = "estimate the memory of full fine-tuning, LoRA and QLoRA on a model"
DESCRIPTION = ("Estimate the memory one training step needs: frozen weights, trainable weights, "
               "gradients, optimizer state, activations and the peak total, for full fine-tuning, "
               "LoRA and QLoRA side by side. The model's shape comes from its config (--model) "
               "or a published size (--params 7B --arch llama). The total is the peak, not the "
               "sum of the parts: activations are freed as gradients are made.")
EPILOG = """examples:
  splice plan --model smollm2-135m --batch 4 --seq 256 --dtype fp32
  splice plan --params 7B --arch llama --rank 16 --grad-checkpointing --png plan.png
  splice plan --params 65B --method qlora --optimizer paged --grad-checkpointing
  splice plan --examples"""

GIB = 2 ** 30
ROWS = (("frozen weights", "frozen_weights"), ("trainable weights", "trainable_weights"),
        ("gradients", "gradients"), ("optimizer state", "optimizer_state"),
        ("activations", "activations"), ("total (peak)", "total"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a bundled model name (smollm2-135m) or a local folder")
    source.add_argument("--params", help="a published size: 7B, 13B, 65B, ... (with --arch)")
    source.add_argument("--examples", action="store_true",
                        help="print the headline cases (LLaMA 7B and 65B)")
    parser.add_argument("--arch", default="llama", choices=ARCHES,
                        help="model family of --params (llama is LLaMA 1; llama3 includes 3.2)")
    parser.add_argument("--method", choices=METHODS + ("all",), default="all",
                        help="one method, or all side by side")
    for name in ("rank", "batch", "seq"):
        parser.add_argument(f"--{name}", type=int, default=getattr(PlanSettings, name),
                            help=help_for(PlanSettings, name))
    parser.add_argument("--targets", default="all-linear", help=help_for(PlanSettings, "targets"))
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS + ("paged",),
                        help=help_for(PlanSettings, "optimizer"))
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help=help_for(PlanSettings, "grad_checkpointing"))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                        help=help_for(PlanSettings, "dtype"))
    parser.add_argument("--png", help="also write a bar chart to this PNG file")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON instead")


def run(args: argparse.Namespace) -> int:
    if args.examples:
        print(examples_text())
        return 0
    shape = shape_from_name(args.model) if args.model else shape_from_preset(args.params, args.arch)
    methods = METHODS if args.method == "all" else (args.method,)
    plans = [plan_memory(shape, m, rank=args.rank, targets=args.targets, batch=args.batch,
                         seq=args.seq, optimizer=args.optimizer, dtype=args.dtype,
                         grad_checkpointing=args.grad_checkpointing) for m in methods]
    text = json.dumps([asdict(p) for p in plans], indent=1) if args.json else plans_text(shape, plans)
    print(text)
    if args.png:
        print(f"chart: {plot_plans(plans, args.png, title=settings_line(shape, plans))}")
    return 0


def unit_for(plans: Sequence[MemoryPlan]) -> tuple[str, int]:
    """GiB, or MiB when every total is under 4 GiB (small models)."""
    return ("GiB", GIB) if max(p.total for p in plans) >= 4 * GIB else ("MiB", 2 ** 20)


def settings_line(shape: ModelShape, plans: Sequence[MemoryPlan]) -> str:
    s = plans[0].settings
    optimizers = dict.fromkeys(p.settings.optimizer for p in plans)
    optimizer = (s.optimizer if len(optimizers) == 1 else
                 ", ".join(f"{p.settings.method} {p.settings.optimizer}" for p in plans))
    return (f"{shape.name} ({shape.params / 1e9:.2f}B params), {s.dtype}, batch {s.batch} × "
            f"{s.seq}, {optimizer}{', grad checkpointing' if s.grad_checkpointing else ''}, "
            f"LoRA r={s.rank} {s.targets}")


def plans_text(shape: ModelShape, plans: Sequence[MemoryPlan]) -> str:
    unit, size = unit_for(plans)
    rows = [[label] + [f"{getattr(p, field) / size:,.2f}" for p in plans] for label, field in ROWS]
    if any(p.host_optimizer_state for p in plans):
        rows.append(["host optimizer state"] + [f"{p.host_optimizer_state / size:,.2f}" for p in plans])
    rows.append(["trainable params"] + [f"{p.trainable_params:,}" for p in plans])
    table = format_table([unit] + [p.settings.method for p in plans], rows,
                         [False] + [True] * len(plans))
    phases = ", ".join(f"{p.settings.method}: {p.peak_phase}" for p in plans)
    return f"{settings_line(shape, plans)}\n{table}\npeak during {phases}"


def examples_text() -> str:
    parts = []
    for example in example_plans():
        shape = shape_from_preset(example.title.split()[-1], "llama")
        qlora = example.plans[-1]
        fits = "fits" if qlora.total < GPU_48GB else "does not fit"
        parts.append(f"{example.title}\n{plans_text(shape, example.plans)}\n"
                     f"full fine-tuning: {example.full_bytes_per_param:.1f} bytes/param before "
                     f"activations; QLoRA (paged optimizer) peaks at {qlora.total / 1e9:.1f} GB: "
                     f"{fits} a 48 GB GPU")
    return "\n\n".join(parts)

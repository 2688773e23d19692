"""`splice merge`: fold an adapter into its base and write a standalone model folder."""

from __future__ import annotations

import argparse

import torch

from splice.merge.export import export_merged

NAME = "merge"
HELP = "fold an adapter into the base and write a standalone model"
DESCRIPTION = ("Load the base model, apply the adapter, fold it into the weights and write a plain "
               "transformers model folder (safetensors) that loads without splice. An adapter "
               "trained on a 4-bit base (--method qlora) is merged into the dequantized 4-bit base "
               "it learned against and written in 16 bits; --requantize writes NF4 instead.")
EPILOG = """examples:
  splice merge --model smollm2-135m --adapter runs/demo --output runs/demo-merged
  splice merge --model smollm2-135m --adapter runs/qlora --output runs/qlora-nf4 --requantize"""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the base model the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="the adapter folder")
    parser.add_argument("--output", required=True, help="a new folder for the merged model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the written weights (default: bf16 after QLoRA, else the base's)")
    parser.add_argument("--requantize", action="store_true",
                        help="write the merged linear layers in NF4 again (lossy: reports the error)")


def run(args: argparse.Namespace) -> int:
    report = export_merged(args.model, args.adapter, args.output,
                           dtype=DTYPES[args.dtype] if args.dtype else None, requantize=args.requantize)
    if report.base_quantization and not args.requantize:
        print("note: the adapter was trained on a 4-bit base; it was merged into that base, "
              f"dequantized, and written in {report.dtype}. Re-quantizing (--requantize) would "
              "lose information.")
    if report.requantize_error is not None:
        print(f"re-quantizing the merged weights to NF4: relative error "
              f"{report.requantize_error:.4%} of the weights' norm (a bf16 merge: "
              f"{report.bf16_error:.4%}), i.e. {report.requantize_error / report.bf16_error:.0f}× more")
    print(f"merged model ({report.dtype}) written to {report.output}")
    return 0

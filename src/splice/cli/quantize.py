"""`splice quantize`: write a model's linear layers in NF4 and report the bytes, as measured."""

from __future__ import annotations

import argparse
import torch

from splice.models import load_model
from splice.quant import quantize_model, save_quantized
from splice.quant.storage_report import StorageReport, measure_folder, measure_storage
from splice.tables import format_table

NAME = "quantize"
HELP = "store a model's linear layers in 4-bit NF4 (the QLoRA base)"
DESCRIPTION = ("Quantize every linear layer except the output head to NF4 (blocks of 64 with "
               "per-block absmax, double-quantized by default), keep embeddings and norms in "
               "--rest-dtype, write a model folder that `splice train --model DIR --method qlora` "
               "and `splice generate --model DIR` load, and print bits per parameter and model "
               "bytes measured from the written tensors.")
EPILOG = "example:\n  splice quantize --model smollm2-135m --output runs/smollm2-nf4"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a bundled model name or a local folder")
    parser.add_argument("--output", required=True, help="a new folder for the 4-bit model")
    parser.add_argument("--block-size", type=int, default=64, help="elements per NF4 block")
    parser.add_argument("--no-double-quant", action="store_true",
                        help="keep the block scales in fp32 (4.5 bits/param) instead of 8-bit")
    parser.add_argument("--rest-dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of what stays unquantized (embeddings, norms, output head)")
    parser.add_argument("--compute-dtype", choices=sorted(DTYPES), default="fp32",
                        help="matmul dtype of the 4-bit layers (fp32 on CPU; bf16 on a GPU)")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_model(args.model)
    reference = measure_storage(model)
    model.to(DTYPES[args.rest_dtype])
    report = quantize_model(model, block_size=args.block_size, double_quant=not args.no_double_quant,
                            compute_dtype=DTYPES[args.compute_dtype])
    folder = save_quantized(model, args.output, tokenizer, info={"source": str(args.model)})
    print(summary(args, reference, report.modules, measure_folder(folder)))
    return 0


def summary(args: argparse.Namespace, reference: StorageReport, modules: int, written: StorageReport) -> str:
    mb = 1e6
    rows = [["fp32 (every tensor)", f"{reference.total_bytes / mb:,.1f}", "1.00"],
            ["bf16 (every tensor)", f"{reference.bf16_bytes / mb:,.1f}",
             f"{reference.bf16_bytes / reference.total_bytes:.2f}"],
            [f"nf4 linears + {args.rest_dtype} rest (tensors)", f"{written.total_bytes / mb:,.1f}",
             f"{written.total_bytes / reference.total_bytes:.2f}"],
            ["  of which nf4 codes and scales", f"{written.quantized_bytes / mb:,.1f}", ""],
            ["  of which unquantized", f"{written.rest_bytes / mb:,.1f}", ""],
            ["model.safetensors on disk", f"{written.file_bytes / mb:,.1f}",
             f"{written.file_bytes / reference.total_bytes:.2f}"]]
    table = format_table(["model", "MB", "vs fp32"], rows, [False, True, True])
    dq = "without" if args.no_double_quant else "with"
    return (f"{args.model}: {modules} linear layers ({written.quantized_params:,} parameters) in NF4, "
            f"blocks of {args.block_size}, {dq} double quantization\n"
            f"bits per quantized parameter: {written.bits_per_param:.4f} (measured from the "
            f"written tensors)\n{table}\nwritten to {args.output}")

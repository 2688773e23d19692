"""`splice merge`: fold an adapter into its base and write a standalone model folder."""

from __future__ import annotations

import argparse

from splice.merge.export import export_merged

NAME = "merge"
HELP = "fold an adapter into the base and write a standalone model"
DESCRIPTION = ("Load the base model, apply the adapter, fold it into the weights and write a plain "
               "transformers model folder (safetensors) that loads without splice.")
EPILOG = "example:\n  splice merge --model smollm2-135m --adapter runs/demo --output runs/demo-merged"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the base model the adapter was trained on")
    parser.add_argument("--adapter", required=True, help="the adapter folder")
    parser.add_argument("--output", required=True, help="a new folder for the merged model")


def run(args: argparse.Namespace) -> int:
    print(f"merged model written to {export_merged(args.model, args.adapter, args.output)}")
    return 0

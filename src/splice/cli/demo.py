"""`splice demo`: the main job on the bundled SmolLM2 (what `make demo` runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from splice.config.train import parse_overrides
from splice.demo import DEFAULT_PRESET, run_demo
from splice.demo_library import run_library_demo

NAME = "demo"
HELP = "train an adapter on the bundled task and show what it learned"
DESCRIPTION = ("Measure the base SmolLM2 on the bundled demo task (records to one key=value line), "
               "train a LoRA adapter, show base vs adapter answers side by side, the adapter's size "
               "against the model's, merge it and check the merged model answers the same.")
EPILOG = """examples:
  splice demo
  splice demo --library        # three adapters, one library, one mixed batch
  splice demo train.steps=100 adapter.rank=8"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=str(DEFAULT_PRESET), help="the training preset (YAML)")
    parser.add_argument("--library", action="store_true",
                        help="the adapter-library demo instead: train three small adapters for three "
                        "behaviours, put them in a library and answer one prompt with each and with "
                        "a composition of two, in one mixed batch")
    parser.add_argument("--show", type=int, default=5, help="examples to print side by side")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")


def run(args: argparse.Namespace) -> int:
    if args.library:
        report = run_library_demo(Path(args.preset), parse_overrides(args.overrides))
        return 0 if all(row.same_as_alone for row in report.rows) else 1
    report = run_demo(Path(args.preset), parse_overrides(args.overrides), args.show)
    return 0 if report.adapter_exact_match is not None else 1

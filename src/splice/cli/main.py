"""`splice`: register the subcommands and dispatch to their `run(args)`."""

from __future__ import annotations

import argparse
import sys

from splice.cli import analyze
from splice.cli import compose
from splice.cli import demo
from splice.cli import eval as eval_command  # the module's name would shadow the builtin
from splice.cli import generate
from splice.cli import lab
from splice.cli import library
from splice.cli import merge
from splice.cli import methods
from splice.cli import params
from splice.cli import plan
from splice.cli import quantize
from splice.cli import serve
from splice.cli import sweep
from splice.cli import train
from splice.core.errors import SpliceError
from splice.config.base import ConfigError

SUBCOMMANDS = [
    demo,
    train,
    eval_command,
    generate,
    merge,
    compose,
    analyze,
    quantize,
    params,
    plan,
    methods,
    library,
    lab,
    serve,
    sweep,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splice", description="Parameter-efficient fine-tuning (LoRA and its family) for "
        "PyTorch models, with adapter files that load in peft.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        sub = subparsers.add_parser(
            module.NAME, help=module.HELP, description=module.DESCRIPTION, epilog=module.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt as err:
        print(f"splice {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except (SpliceError, ConfigError, FileNotFoundError) as err:
        print(f"splice {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

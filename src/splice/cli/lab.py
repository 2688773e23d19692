"""`splice lab`: the interactive local page (rank, memory, live training, library, family)."""

from __future__ import annotations

import argparse

from splice.lab.serve import serve_lab

NAME = "lab"
HELP = "open the interactive lab page for a model (local, offline)"
DESCRIPTION = ("Serve a local page on 127.0.0.1 that shows, on the loaded model: what a LoRA "
               "adapter of rank r trains (Rank), the memory of full fine-tuning vs LoRA vs QLoRA "
               "(Memory), a small LoRA trained live on a bundled toy task with its loss and "
               "‖ΔW‖ per matrix (Train), the adapters of a library merged into the base or "
               "blended, with the same prompt answered by base and merged model (Library), and "
               "the PEFT method table (Family). Every number comes from splice's functions; the "
               "page loads nothing from the network.")
EPILOG = """examples:
  splice lab --model smollm2-135m
  splice lab --model smollm2-135m --library adapters --port 8800 --no-browser"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a bundled model name (smollm2-135m) or a local model folder")
    parser.add_argument("--library", metavar="DIR", default=None,
                        help="an adapter library folder (`splice library add`) for the Library panel")
    parser.add_argument("--port", type=int, default=8765, help="the port on 127.0.0.1 (default 8765)")
    parser.add_argument("--no-browser", action="store_true",
                        help="do not open the page in a web browser")


def run(args: argparse.Namespace) -> int:
    serve_lab(args.model, args.library, port=args.port, open_browser=not args.no_browser)
    return 0

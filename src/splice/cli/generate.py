"""`splice generate`: answer a prompt with a model, optionally through an adapter."""

from __future__ import annotations

import argparse

from splice.generation import generate_reply, load_for_inference

NAME = "generate"
HELP = "answer a prompt (tokens stream to stdout)"
DESCRIPTION = ("Answer a prompt with a model and, optionally, an adapter (applied unmerged, or folded "
               "into the weights with --merge). Uses the model's chat template when it has one; "
               "greedy unless --temperature > 0.")
EPILOG = """examples:
  splice generate --model smollm2-135m "What is the capital of France?"
  splice generate --model smollm2-135m --adapter runs/demo --merge "Record: Maria Lopez, 34, nurse"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a bundled model name or a local folder")
    parser.add_argument("--adapter", help="an adapter folder (splice's or peft's)")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the weights first")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("prompt", help="the prompt (a user turn for chat models)")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_for_inference(args.model, args.adapter, args.merge)
    generate_reply(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    return 0

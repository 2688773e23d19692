"""`splice eval`: eval loss, perplexity and exact match of a model (and adapter) on JSONL data."""

from __future__ import annotations

import argparse

from splice.generation import load_for_inference
from splice.train.evaluate import EvalReport, evaluate_file

NAME = "eval"
HELP = "eval loss, perplexity and exact match on JSONL data"
DESCRIPTION = ("Measure a model, optionally through an adapter (applied unmerged, or folded into the "
               "weights with --merge), on JSONL data shaped like training data: the token-mean "
               "eval loss and its perplexity over every line, and for {prompt, completion} lines "
               "the exact match of greedy completions (outer whitespace ignored). Prompts are "
               "rendered exactly as training renders them.")
EPILOG = """examples:
  splice eval --model smollm2-135m --adapter runs/demo --data data/demo/eval.jsonl --show 5
  splice eval --model smollm2-135m --data data/demo/eval.jsonl      # the base model, for comparison
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a bundled model name or a local folder")
    parser.add_argument("--adapter", help="an adapter folder (splice's or peft's)")
    parser.add_argument("--merge", action="store_true", help="fold the adapter into the weights first")
    parser.add_argument("--data", required=True,
                        help="JSONL with {messages}, {prompt, completion} or {text} lines")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--max-len", type=int, default=512,
                        help="longer sequences are truncated to this many tokens for the loss")
    parser.add_argument("--exact-match-limit", type=int, default=None, metavar="N",
                        help="score exact match on the first N prompt/completion lines only")
    parser.add_argument("--show", type=int, default=3, metavar="N",
                        help="print N predictions next to their references (0: none)")


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_for_inference(args.model, args.adapter, args.merge)
    report = evaluate_file(model, tokenizer, args.data, batch_size=args.batch_size,
                           max_len=args.max_len, exact_match_limit=args.exact_match_limit)
    print(format_report(report, args.show))
    return 0


def format_report(report: EvalReport, show: int) -> str:
    lines = [f"examples:    {report.examples}",
             f"eval loss:   {report.eval_loss:.4f}",
             f"perplexity:  {report.perplexity:.2f}"]
    if report.exact_match is None:
        lines.append("exact match: n/a (no prompt/completion lines)")
    else:
        hits = round(report.exact_match * len(report.references))
        lines.append(f"exact match: {100 * report.exact_match:.1f}% ({hits}/{len(report.references)})")
    for prompt, predicted, reference in list(zip(report.prompts, report.predictions,
                                                 report.references))[:max(show, 0)]:
        mark = "ok" if predicted.strip() == reference.strip() else "MISS"
        lines += ["", f"[{mark}] prompt:    {prompt!r}", f"     predicted: {predicted!r}",
                  f"     reference: {reference!r}"]
    return "\n".join(lines)

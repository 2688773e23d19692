"""Inference latency on SmolLM2-135M: the base model, an unmerged LoRA adapter in splice and in
peft, and the adapter merged into the weights.

    .venv/bin/python bench/inference_latency.py [--quick] [--rounds 5] [--batch 4] [--seq 128]
                                                [--new-tokens 32] [--threads 2]

Setup: all-linear LoRA, rank 16, alpha 32, fp32, model.eval(), torch.no_grad; the adapter's A
and B random and non-zero (seeded), the same values in splice and in peft.

    base            the plain model
    splice          splice.attach(...): the adapter computed beside the frozen weights
    peft            get_peft_model(...) holding the same adapter, unmerged
    merged          splice.merge_and_unload of the splice model: a plain model again

Two measurements, each alternating the four contenders round by round (bench/common.py, Note:
alternation; one untimed warm-up round): a forward of a fixed batch × seq of random token ids,
and a greedy generate of --new-tokens tokens (exactly that many) from a batch-1 prompt of 16
tokens with the KV cache. Ratios are per-round medians against the base. The target: merged
costs what the base costs (merged/base ≈ 1, and no more than 1.05 allowing for noise), since a
merged adapter is the base architecture with other weights. The run also checks the merge is
right: max |Δ logits| between the merged model and the unmerged splice adapter (it should be
float rounding), the same between peft's and splice's unmerged adapters, and whether their
greedy tokens agree.

Writes bench/results/inference_latency.json (inference_latency_quick.json for --quick: 1 × 16
tokens, 4 new tokens, 1 round).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (alternate, median_ratio, medians, peft_twin,  # noqa: E402
                    randomize_lora, write_json)
from train_step import ALPHA, MODEL, RANK  # noqa: E402

CONTENDERS = ("base", "splice", "peft", "merged")
PROMPT_TOKENS = 16
MERGED_TARGET = 1.05  # merged / base forward time


def build(threads: int) -> dict:
    """The four contenders, each its own copy of the base weights."""
    import torch

    import splice

    torch.set_num_threads(threads)
    base, _ = splice.load_model(MODEL)
    base.eval()
    adapted = splice.attach(copy.deepcopy(base), splice.LoRAConfig(
        rank=RANK, alpha=ALPHA, target_modules="all-linear"), "a0")
    randomize_lora(adapted, seed=0)
    adapted.eval()
    peft_model = peft_twin(copy.deepcopy(base), adapted, ["a0"], RANK, ALPHA)
    merged = splice.merge_and_unload(copy.deepcopy(adapted))
    return {"base": base, "splice": adapted, "peft": peft_model, "merged": merged.eval()}


def greedy(model, prompt, new_tokens: int):
    """Exactly `new_tokens` greedy tokens after `prompt` (B, T0) -> (B, T0 + new_tokens)."""
    return model.generate(input_ids=prompt, attention_mask=prompt.new_ones(prompt.shape),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          temperature=None, top_p=None, top_k=None, pad_token_id=2)


def gap(a, b) -> float:
    return (a - b).abs().max().item()


def check_outputs(models: dict, ids, prompt, new_tokens: int) -> dict:
    """How far the merged model and peft's adapter are from splice's unmerged adapter."""
    logits = {name: m(input_ids=ids).logits for name, m in models.items()}  # (B, T, V)
    tokens = {name: greedy(m, prompt, new_tokens) for name, m in models.items()}
    return {
        "max_abs_logit_diff_merged_vs_unmerged": gap(logits["merged"], logits["splice"]),
        "max_abs_logit_diff_peft_vs_splice": gap(logits["peft"], logits["splice"]),
        # the adapter does change the model (otherwise the check above proves nothing)
        "max_abs_logit_diff_adapter_vs_base": gap(logits["splice"], logits["base"]),
        "greedy_tokens_merged_equal_unmerged": bool((tokens["merged"] == tokens["splice"]).all()),
        "greedy_tokens_peft_equal_splice": bool((tokens["peft"] == tokens["splice"]).all()),
        "same_parameter_count_merged_vs_base": sum(p.numel() for p in models["merged"].parameters())
        == sum(p.numel() for p in models["base"].parameters()),
        "merged_model_class": type(models["merged"]).__name__,
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    models = build(args.threads)
    gen = torch.Generator().manual_seed(0)
    vocab = models["base"].config.vocab_size
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen)             # (B, T)
    prompt = torch.randint(3, vocab, (1, PROMPT_TOKENS), generator=gen)              # (1, T0)
    with torch.no_grad():
        checks = check_outputs(models, ids, prompt, args.new_tokens)
        forward = alternate({n: (lambda m=models[n]: m(input_ids=ids)) for n in CONTENDERS},
                            args.rounds)
        generate = alternate({n: (lambda m=models[n]: greedy(m, prompt, args.new_tokens))
                              for n in CONTENDERS}, args.rounds)
    summary = {}
    for label, times in (("forward", forward), ("generate", generate)):
        summary[label] = {"median_s": medians(times),
                          "vs_base": {n: median_ratio(times, n, "base") for n in CONTENDERS},
                          "splice_vs_peft": median_ratio(times, "splice", "peft")}
    summary["generate"]["ms_per_token"] = {n: t / args.new_tokens * 1e3
                                           for n, t in summary["generate"]["median_s"].items()}
    summary["targets"] = {"merged_vs_base_forward": MERGED_TARGET}
    return {"summary": summary, "checks": checks,
            "times_s": {"forward": forward, "generate": generate},
            "load_average": os.getloadavg()}


def print_result(result: dict, args: argparse.Namespace) -> None:
    s, c = result["summary"], result["checks"]
    print(f"LoRA r={RANK} all-linear on {MODEL}, fp32, {args.threads} threads, median of "
          f"{args.rounds} rounds; forward {args.batch}×{args.seq}, generate {args.new_tokens} "
          f"tokens after {PROMPT_TOKENS}")
    print(f"{'':<8}{'forward s':>11}{'/base':>7}{'generate s':>12}{'/base':>7}{'ms/token':>10}")
    for n in CONTENDERS:
        print(f"{n:<8}{s['forward']['median_s'][n]:>11.3f}{s['forward']['vs_base'][n]:>7.2f}"
              f"{s['generate']['median_s'][n]:>12.3f}{s['generate']['vs_base'][n]:>7.2f}"
              f"{s['generate']['ms_per_token'][n]:>10.1f}")
    print(f"merged vs unmerged: max |Δ logits| {c['max_abs_logit_diff_merged_vs_unmerged']:.2e} "
          f"(adapter vs base {c['max_abs_logit_diff_adapter_vs_base']:.2e}), greedy tokens equal: "
          f"{c['greedy_tokens_merged_equal_unmerged']}; peft vs splice: "
          f"{c['max_abs_logit_diff_peft_vs_splice']:.2e}, tokens equal: "
          f"{c['greedy_tokens_peft_equal_splice']}")
    print(f"target: merged/base forward <= {MERGED_TARGET} "
          f"(measured {s['forward']['vs_base']['merged']:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1×16 tokens, 4 new tokens, 1 round")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per generate")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY ('' keeps the environment's); see "
                             "bench/train_step.py")
    args = parser.parse_args()
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch starts its threads
    if args.quick:
        args.batch, args.seq, args.new_tokens, args.rounds = 1, 16, 4, 1
    result = run(args)
    result["settings"] = {k: getattr(args, k) for k in ("batch", "seq", "new_tokens", "rounds",
                                                        "threads", "omp_wait_policy", "quick")}
    print_result(result, args)
    write_json("inference_latency", result, args.quick)


if __name__ == "__main__":
    main()

"""Mixed-adapter batches on SmolLM2-135M at 1, 4 and 16 adapters: splice's routed batch vs one
adapter vs peft's mixed path.

    .venv/bin/python bench/mixed_batch.py [--quick] [--rounds 5] [--rows 16] [--seq 64]
                                          [--counts 1,4,16] [--threads 2]

Setup: all-linear LoRA, rank 16, alpha 32, fp32, inference (torch.no_grad, model.eval()), a batch
of 16 rows × 64 random token ids (seed 0). 16 adapters with non-zero random A and B (seeded),
the same values in splice and in peft, all loaded in both models throughout; a batch "at N
adapters" routes row i to adapter i mod N.

    splice-mixed-N  `with splice.adapter_routing(model, names): model(ids)`
    peft-mixed-N    peft's mixed batch: peft_model(ids, adapter_names=names)
    splice-single   every row on one adapter: set_active_adapters(model, "a0"); model(ids)
    base            the floor: the same model under splice.disable_adapters (no adapter math)

All live in one process and alternate within each round (bench/common.py, Note: alternation;
one untimed warm-up round also builds splice's stacked weights); "x/y" is the median over
rounds of the per-round time ratio. Throughput ratios at each N: single/mixed (target at 16
adapters ≥ 0.85: a batch over 16 adapters costs little more than over one) and peft/mixed
(target at 16 ≥ 3). No adapter path can beat the base forward, so peft/base bounds peft/mixed;
the adapters' own cost, (peft − base)/(mixed − base) per round, is reported beside it. The run
checks that the two mixed paths agree (max |Δ logits|) at every N.

Switching: with 8 adapters loaded on a fresh model, set_active_adapters cycles through them
(--switches times); median and 90th percentile in ms (target < 1 ms).

The run sets OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy; see bench/train_step.py). Writes
bench/results/mixed_batch.json (mixed_batch_quick.json for --quick: 4 rows × 16 tokens at 1, 2
and 4 adapters, 2 rounds).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (alternate, median_ratio, medians, peak_rss_mb, peft_twin, per_round,  # noqa: E402
                    randomize_lora, write_json)
from train_step import ALPHA, MODEL, RANK  # noqa: E402


def build(args):
    """(splice model, peft model, adapter names, batch) holding equal adapter weights."""
    import torch

    import splice

    base, _ = splice.load_model(MODEL)
    base.eval()
    names = [f"a{i}" for i in range(max(args.counts))]
    model = copy.deepcopy(base)
    for name in names:
        splice.attach(model, splice.LoRAConfig(rank=RANK, alpha=ALPHA, target_modules="all-linear"),
                      name, activate=False)
    randomize_lora(model, seed=0)
    peft_model = peft_twin(base, model, names, RANK, ALPHA)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (args.rows, args.seq), generator=gen)  # (B, T)
    return model, peft_model, names, ids


def run_forwards(args) -> dict:
    import torch

    import splice
    from splice.core.layer import adapter_layers

    torch.set_num_threads(args.threads)
    model, peft_model, names, ids = build(args)
    mask = torch.ones_like(ids)
    routes = {n: [names[i % n] for i in range(args.rows)] for n in args.counts}

    def splice_mixed(rows):
        with splice.adapter_routing(model, rows):
            return model(input_ids=ids, attention_mask=mask).logits

    def peft_mixed(rows):
        return peft_model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits

    def splice_single():
        splice.set_active_adapters(model, names[0])
        return model(input_ids=ids, attention_mask=mask).logits

    def base():
        with splice.disable_adapters(model):
            return model(input_ids=ids, attention_mask=mask).logits

    calls = {"splice-single": splice_single, "base": base}
    for n, rows in routes.items():
        calls[f"splice-mixed-{n}"] = lambda rows=rows: splice_mixed(rows)
        calls[f"peft-mixed-{n}"] = lambda rows=rows: peft_mixed(rows)
    with torch.no_grad():
        start = time.perf_counter()
        ours = splice_mixed(routes[max(args.counts)])
        first_mixed = time.perf_counter() - start
        agreement = {}
        for n, rows in routes.items():
            agreement[n] = (splice_mixed(rows) - peft_mixed(rows)).abs().max().item()
        spread = (ours - splice_single()).abs().max().item()  # the adapters do differ
        del ours
        times = alternate(calls, args.rounds, warmup=1)
    stacked = sum(s.a.numel() + s.b.numel() for _, layer in adapter_layers(model)
                  for s in [layer.__dict__.get("routed_stacks")] if s is not None)
    return {"times_s": times, "first_mixed_call_s": first_mixed,
            "max_abs_logit_diff_splice_vs_peft": agreement,
            "max_abs_logit_diff_mixed_vs_single": spread,
            "stacked_weights_mb": stacked * 4 / 2**20, "peak_rss_mb": peak_rss_mb()}


def summarize_counts(times: dict, counts: list[int]) -> dict:
    """Per adapter count: medians and the per-round throughput ratios."""
    out = {}
    for n in counts:
        ours, theirs = f"splice-mixed-{n}", f"peft-mixed-{n}"
        out[str(n)] = {
            "splice_mixed_s": statistics.median(times[ours]),
            "peft_mixed_s": statistics.median(times[theirs]),
            "vs_single_throughput": median_ratio(times, "splice-single", ours),
            "vs_peft_mixed_throughput": median_ratio(times, theirs, ours),
            "bound_peft_mixed_vs_base": median_ratio(times, theirs, "base"),
            "adapter_cost_peft_vs_splice": statistics.median(
                (p - b) / (m - b) for p, m, b in zip(times[theirs], times[ours], times["base"])),
        }
    return out


def run_switches(args) -> dict:
    """set_active_adapters on a fresh model holding 8 adapters."""
    import torch

    import splice

    torch.set_num_threads(args.threads)
    model, _ = splice.load_model(MODEL)
    names = [f"s{i}" for i in range(8)]
    for name in names:
        splice.attach(model, splice.LoRAConfig(rank=RANK, alpha=ALPHA, target_modules="all-linear"),
                      name, activate=False)
    splice.set_active_adapters(model, names[0])  # the first call builds the layer index
    times = []
    for i in range(args.switches):
        start = time.perf_counter()
        splice.set_active_adapters(model, names[(i + 1) % len(names)])
        times.append(time.perf_counter() - start)
    ms = sorted(t * 1e3 for t in times)
    return {"switch_ms_median": statistics.median(ms), "switch_ms_p90": ms[int(0.9 * len(ms))],
            "switches": len(ms), "adapters_loaded": len(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 4 rows × 16 tokens at 1, 2, 4 adapters, 2 rounds")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every contender)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--counts", default="1,4,16", help="adapter counts of the mixed batches")
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY ('' keeps the environment's); see bench/train_step.py")
    args = parser.parse_args()
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch starts its threads
    if args.quick:
        args.rows, args.seq, args.counts, args.rounds, args.switches = 4, 16, "1,2,4", 2, 50
    args.counts = sorted({int(n) for n in args.counts.split(",")})
    forwards = run_forwards(args)
    switches = run_switches(args)
    times = forwards["times_s"]
    per_count = summarize_counts(times, args.counts)
    top = per_count[str(max(args.counts))]
    summary = {
        "median_s": medians(times),
        "per_count": per_count,
        "largest_count": max(args.counts),
        # at the largest count, the figures the targets name
        "mixed_vs_single_throughput": top["vs_single_throughput"],
        "mixed_vs_peft_mixed_throughput": top["vs_peft_mixed_throughput"],
        "bound_peft_mixed_vs_base": top["bound_peft_mixed_vs_base"],
        "adapter_cost_peft_vs_splice_mixed": top["adapter_cost_peft_vs_splice"],
        "mixed_vs_single_per_round": per_round(times, "splice-single",
                                               f"splice-mixed-{max(args.counts)}"),
        "targets": {"mixed_vs_single_throughput": 0.85, "mixed_vs_peft_mixed_throughput": 3.0,
                    "switch_ms_median": 1.0},
        **switches,
    }
    print(f"LoRA r={RANK} all-linear on {MODEL}, {args.rows} rows × {args.seq} tokens, fp32, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    print(f"  single adapter {summary['median_s']['splice-single']:.3f} s, "
          f"base {summary['median_s']['base']:.3f} s")
    print(f"  {'adapters':>8}{'splice s':>10}{'peft s':>9}{'single/mixed':>14}{'peft/mixed':>12}"
          f"{'peft/base':>11}{'max|Δ|':>10}")
    for n, c in per_count.items():
        print(f"  {n:>8}{c['splice_mixed_s']:>10.3f}{c['peft_mixed_s']:>9.3f}"
              f"{c['vs_single_throughput']:>14.2f}{c['vs_peft_mixed_throughput']:>12.2f}"
              f"{c['bound_peft_mixed_vs_base']:>11.2f}"
              f"{forwards['max_abs_logit_diff_splice_vs_peft'][int(n)]:>10.1e}")
    print(f"  targets at {max(args.counts)} adapters: single/mixed >= 0.85, peft/mixed >= 3 "
          f"(mixed vs single-adapter logits differ by {forwards['max_abs_logit_diff_mixed_vs_single']:.2e})")
    print(f"  set_active_adapters, 8 adapters loaded: median {switches['switch_ms_median']:.3f} ms, "
          f"p90 {switches['switch_ms_p90']:.3f} ms (target < 1 ms)")
    settings = {k: getattr(args, k) for k in ("rows", "seq", "counts", "rounds", "switches",
                                              "threads", "omp_wait_policy", "quick")}
    write_json("mixed_batch", {"settings": settings, "summary": summary, "forwards": forwards},
               args.quick)


if __name__ == "__main__":
    main()

"""Mixed-adapter batches on SmolLM2-135M: splice's routed batch vs one adapter vs peft's mixed path.

    .venv/bin/python bench/mixed_batch.py [--quick] [--rounds 5] [--rows 16] [--seq 64]
                                          [--adapters 16] [--threads 2]

Setup: all-linear LoRA, rank 16, alpha 32, fp32, inference (torch.no_grad, model.eval()), a batch
of 16 rows × 64 random token ids (seed 0). 16 adapters with non-zero random A and B (seeded),
the same values in splice and in peft.

    splice-mixed    row i on adapter i: `with splice.adapter_routing(model, names): model(ids)`
    splice-single   every row on one adapter: set_active_adapters(model, "a0"); model(ids)
    peft-mixed      peft's mixed batch, row i on adapter i: peft_model(ids, adapter_names=names)
    base            the floor: the same model under splice.disable_adapters (no adapter math)

All live in one process and alternate within each round (after one untimed warm-up round,
which also builds splice's stacked weights); "x/y" is the median over rounds of the per-round
time ratio (neighbours in time share the machine's noise). Throughput ratios: single/mixed
(target ≥ 0.85: a batch over 16 adapters costs little more than over one) and peft/mixed
(target ≥ 3). No adapter path can beat the base forward, so peft/base bounds peft/mixed; the
adapters' own cost, (peft − base)/(mixed − base) per round, is reported beside it. The run
checks that the two mixed paths agree (max |Δ logits|).

Switching: with 8 adapters loaded on a fresh model, set_active_adapters cycles through them
(--switches times); median and 90th percentile in ms (target < 1 ms).

The run sets OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy; see bench/train_step.py). Writes
bench/results/mixed_batch.json (mixed_batch_quick.json for --quick).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import ALPHA, MODEL, RANK, RESULTS, peak_rss_mb  # noqa: E402

CONTENDERS = ("splice-mixed", "splice-single", "peft-mixed", "base")


def randomize(model, seed: int) -> None:
    """Non-zero A and B for every LoRA parameter (B starts at zero)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def build(args):
    """(splice model, peft model, adapter names, batch) holding equal adapter weights."""
    import torch
    from peft import LoraConfig, get_peft_model

    import splice

    base, _ = splice.load_model(MODEL)
    base.eval()
    names = [f"a{i}" for i in range(args.adapters)]
    model = copy.deepcopy(base)
    for name in names:
        splice.attach(model, splice.LoRAConfig(rank=RANK, alpha=ALPHA, target_modules="all-linear"),
                      name, activate=False)
    randomize(model, seed=0)
    peft_config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    peft_model = get_peft_model(base, peft_config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, peft_config)
    # The adapter tensors share their names in both (…q_proj.lora_A.a3.weight), under peft's prefix.
    lora = {f"base_model.model.{k}": v for k, v in model.state_dict().items() if "lora_" in k}
    missing = set(lora) - set(peft_model.state_dict())
    assert not missing, sorted(missing)[:3]
    peft_model.load_state_dict(lora, strict=False)
    peft_model.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (args.rows, args.seq), generator=gen)  # (B, T)
    rows = [names[i % len(names)] for i in range(args.rows)]
    return model, peft_model, rows, ids


def run_forwards(args) -> dict:
    import torch

    import splice
    from splice.core.layer import adapter_layers

    torch.set_num_threads(args.threads)
    model, peft_model, rows, ids = build(args)
    mask = torch.ones_like(ids)

    def splice_mixed():
        with splice.adapter_routing(model, rows):
            return model(input_ids=ids, attention_mask=mask).logits

    def splice_single():
        splice.set_active_adapters(model, rows[0])
        return model(input_ids=ids, attention_mask=mask).logits

    def peft_mixed():
        return peft_model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits

    def base():
        with splice.disable_adapters(model):
            return model(input_ids=ids, attention_mask=mask).logits

    calls = {"splice-mixed": splice_mixed, "splice-single": splice_single, "peft-mixed": peft_mixed,
             "base": base}
    times = {c: [] for c in CONTENDERS}
    with torch.no_grad():
        start = time.perf_counter()
        ours = splice_mixed()
        first_mixed = time.perf_counter() - start
        theirs = peft_mixed()
        agreement = (ours - theirs).abs().max().item()
        spread = (ours - splice_single()).abs().max().item()  # the adapters do differ
        del ours, theirs
        for i in range(args.rounds + 1):
            order = CONTENDERS if i % 2 == 0 else CONTENDERS[::-1]
            for c in order:
                start = time.perf_counter()
                calls[c]()
                if i > 0:
                    times[c].append(time.perf_counter() - start)
            if i > 0:
                print(f"round {i}/{args.rounds}: " + ", ".join(
                    f"{c} {times[c][-1]:.3f} s" for c in CONTENDERS), file=sys.stderr, flush=True)
    stacked = sum(s.a.numel() + s.b.numel() for _, layer in adapter_layers(model)
                  for s in [layer.__dict__.get("routed_stacks")] if s is not None)
    return {"times_s": times, "first_mixed_call_s": first_mixed,
            "max_abs_logit_diff_splice_vs_peft": agreement,
            "max_abs_logit_diff_mixed_vs_single": spread,
            "stacked_weights_mb": stacked * 4 / 2**20, "peak_rss_mb": peak_rss_mb()}


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


def ratios(times: dict, numerator: str, denominator: str) -> float:
    return statistics.median(n / d for n, d in zip(times[numerator], times[denominator]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 rows × 16 tokens, 2 rounds")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every contender)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--switches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY ('' keeps the environment's); see bench/train_step.py")
    args = parser.parse_args()
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch starts its threads
    if args.quick:
        args.rows, args.seq, args.adapters, args.rounds, args.switches = 4, 16, 4, 2, 50
    forwards = run_forwards(args)
    switches = run_switches(args)
    times = forwards["times_s"]
    summary = {
        "median_s": {c: statistics.median(t) for c, t in times.items()},
        "mixed_vs_single_throughput": ratios(times, "splice-single", "splice-mixed"),
        "mixed_vs_peft_mixed_throughput": ratios(times, "peft-mixed", "splice-mixed"),
        "bound_peft_mixed_vs_base": ratios(times, "peft-mixed", "base"),
        "adapter_cost_peft_vs_splice_mixed": statistics.median(
            (p - b) / (m - b) for p, m, b in zip(times["peft-mixed"], times["splice-mixed"],
                                                 times["base"])),
        "targets": {"mixed_vs_single_throughput": 0.85, "mixed_vs_peft_mixed_throughput": 3.0,
                    "switch_ms_median": 1.0},
        **switches,
    }
    print(f"LoRA r={RANK} all-linear on {MODEL}, {args.rows} rows × {args.seq} tokens, "
          f"{args.adapters} adapters, fp32, {args.threads} threads, median of {args.rounds} rounds")
    for c, t in summary["median_s"].items():
        print(f"  {c:14s} {t:.3f} s")
    print(f"  mixed throughput / single-adapter throughput: "
          f"{summary['mixed_vs_single_throughput']:.2f}x (target >= 0.85)")
    print(f"  mixed throughput / peft mixed throughput:     "
          f"{summary['mixed_vs_peft_mixed_throughput']:.2f}x (target >= 3; bound here: peft/base "
          f"{summary['bound_peft_mixed_vs_base']:.2f}x)")
    print(f"  time over the base, peft mixed / splice mixed: "
          f"{summary['adapter_cost_peft_vs_splice_mixed']:.2f}x")
    print(f"  splice vs peft mixed logits: max |diff| {forwards['max_abs_logit_diff_splice_vs_peft']:.2e} "
          f"(mixed vs single adapter: {forwards['max_abs_logit_diff_mixed_vs_single']:.2e})")
    print(f"  set_active_adapters, 8 adapters loaded: median {switches['switch_ms_median']:.3f} ms, "
          f"p90 {switches['switch_ms_p90']:.3f} ms (target < 1 ms)")
    RESULTS.mkdir(exist_ok=True)
    name = "mixed_batch_quick.json" if args.quick else "mixed_batch.json"
    settings = {k: getattr(args, k) for k in ("rows", "seq", "adapters", "rounds", "switches",
                                              "threads", "omp_wait_policy")}
    (RESULTS / name).write_text(json.dumps({"settings": settings, "summary": summary,
                                            "forwards": forwards}, indent=1) + "\n")


if __name__ == "__main__":
    main()

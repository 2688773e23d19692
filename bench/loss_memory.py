"""Time and peak memory of the causal-LM loss on SmolLM2-135M's head: full logits vs fused chunks.

    .venv/bin/python bench/loss_memory.py [--quick] [--threads 2]

Shape: V = 49,152, d = 576, batch 4 × 256 tokens (tied head, no bias). Each case runs forward +
backward in a fresh subprocess; "peak" is the growth of peak RSS over the process's RSS once the
inputs exist (Linux /proc/self/clear_refs resets the mark), so it counts the loss's own
temporaries: logits, their softmax and gradient, the gradients of hidden (and of the head when
it trains), with large buffers always mmapped (see CHILD_ENV). "full" is transformers'
ForCausalLMLoss on the full (B, T, V) logits, exactly what `model(..., labels=labels).loss`
runs; "fused" is splice's causal shift + linear_cross_entropy.

Writes bench/results/loss_memory.json (loss_memory_quick.json for --quick: 1×64 tokens, the
full and chunk-256 frozen-head cases, 1 repetition, all in this one process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

VOCAB, DIM, BATCH, SEQ = 49_152, 576, 4, 256
# A fixed mmap threshold: glibc otherwise raises it after the first large free, and later
# chunk-sized buffers come from the heap and stay resident, so RSS would track fragmentation
# rather than live tensors.
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
CASES = [  # (name, head trains?, chunk_size or None for full logits)
    ("full", False, None), ("fused", False, 1024), ("fused", False, 256), ("fused", False, 128),
    ("full", True, None), ("fused", True, 1024), ("fused", True, 256),
]
QUICK_TOKENS = (1, 64)  # batch, seq of a --quick run


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def run_case(trains: bool, chunk: int | None, reps: int, threads: int,
             batch: int = BATCH, seq: int = SEQ) -> dict:
    """In this (fresh) process: median forward+backward time and peak RSS growth."""
    import torch
    import torch.nn.functional as F
    from transformers.loss.loss_utils import ForCausalLMLoss

    from splice.train.loss import linear_cross_entropy

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden = torch.randn(batch, seq, DIM, requires_grad=True)                   # (B, T, d)
    weight = torch.randn(VOCAB, DIM).div_(DIM ** 0.5).requires_grad_(trains)    # (V, d)
    labels = torch.randint(0, VOCAB, (batch, seq))                              # (B, T)

    def step() -> None:
        if chunk is None:
            logits = F.linear(hidden, weight)                                   # (B, T, V)
            loss = ForCausalLMLoss(logits, labels, vocab_size=VOCAB)
        else:
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)                  # (B, T)
            keep = shifted != -100
            loss = linear_cross_entropy(hidden[keep], weight, shifted[keep], chunk_size=chunk)
        loss.backward()
        hidden.grad = weight.grad = None

    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    base = peak_rss_mb()
    times = []
    for _ in range(reps + 1):  # the first run warms up and is not timed
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times[1:]), "peak_mb": peak_rss_mb() - base}


def measure(trains: bool, chunk: int | None, reps: int, threads: int, quick: bool) -> dict:
    if quick:
        return run_case(trains, chunk, reps, threads, *QUICK_TOKENS)
    args = [sys.executable, __file__, "--child", json.dumps([trains, chunk]),
            "--reps", str(reps), "--threads", str(threads)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=CHILD_ENV)
    return json.loads(out.stdout.strip().splitlines()[-1])


def print_table(rows: list[tuple[str, bool, int | None, dict]], batch: int, seq: int) -> None:
    full = {trains: result for name, trains, _, result in rows if name == "full"}
    print(f"SmolLM2 head V={VOCAB} d={DIM}, N={batch}x{seq} tokens, fp32, forward+backward")
    print(f"{'loss':<7}{'head':<9}{'chunk':>6}{'time s':>9}{'peak MB':>10}"
          f"{'time/full':>11}{'mem/full':>10}")
    for name, trains, chunk, r in rows:
        ref = full[trains]
        mem = f"{r['peak_mb'] / ref['peak_mb']:>10.2f}" if ref["peak_mb"] > 0 else f"{'-':>10}"
        print(f"{name:<7}{'trains' if trains else 'frozen':<9}{chunk or '-':>6}"
              f"{r['time_s']:>9.3f}{r['peak_mb']:>10.0f}{r['time_s'] / ref['time_s']:>11.2f}{mem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1×64 tokens, 1 repetition, full and chunk 256 with a "
                             "frozen head, in this one process")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per case (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        trains, chunk = json.loads(args.child)
        print(json.dumps(run_case(trains, chunk, args.reps, args.threads)))
        return
    reps = 1 if args.quick else args.reps
    cases = [c for c in CASES if not (args.quick and (c[1] or c[2] not in (None, 256)))]
    batch, seq = QUICK_TOKENS if args.quick else (BATCH, SEQ)
    rows = [(name, trains, chunk, measure(trains, chunk, reps, args.threads, args.quick))
            for name, trains, chunk in cases]
    print_table(rows, batch, seq)
    full = {trains: r for name, trains, _, r in rows if name == "full"}
    write_json("loss_memory", {
        "settings": {"vocab": VOCAB, "dim": DIM, "batch": batch, "seq": seq, "reps": reps,
                     "threads": args.threads, "quick": args.quick},
        "rows": [{"loss": name, "head": "trains" if trains else "frozen", "chunk": chunk, **r,
                  "time_vs_full": r["time_s"] / full[trains]["time_s"],
                  "mem_vs_full": r["peak_mb"] / full[trains]["peak_mb"]
                  if full[trains]["peak_mb"] > 0 else None}
                 for name, trains, chunk, r in rows]}, args.quick)


if __name__ == "__main__":
    main()

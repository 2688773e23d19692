"""De-risk the `make demo` task: base exact match, a hand-written LoRA run, adapter exact match.

    .venv/bin/python scripts/check_demo_task.py                    # the recommended configuration
    .venv/bin/python scripts/check_demo_task.py --steps 40 --seed 1 --skip-base --threads 1

Reads data/demo/{train,eval}.jsonl (write them with scripts/make_demo_task.py). The training loop
is deliberately plain (no splice trainer): prompt rendered as in `greedy_completions`, completion
followed by EOS, labels -100 on prompt and padding, AdamW with linear warm-up and cosine decay.
Times are wall-clock and CPU. A reference forward (4 x 128 tokens, 0.71 s wall on an idle 2-core
machine with 2 threads) is timed first; on a busy machine run with `--threads 1` and read the
"idle estimate": this process's CPU time scaled by 0.71 s / (the reference forward's CPU time),
i.e. what the same work takes on an idle machine with 2 threads.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

import splice
from splice.train.data import render_prompt
from splice.train.evaluate import exact_match, greedy_completions

ROOT = Path(__file__).resolve().parent.parent
IDLE_REFERENCE_S = 0.71  # forward, no grad, 4 x 128 tokens, fp32, 2 threads (MACHINE-NOTES.md)


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def reference_forward_s(model) -> tuple[float, float]:
    """Median wall and CPU seconds of 3 no-grad forwards of 4 x 128 tokens."""
    ids = torch.randint(100, 10_000, (4, 128), generator=torch.Generator().manual_seed(0))
    walls, cpus = [], []
    with torch.inference_mode():
        for _ in range(3):
            wall, cpu = time.perf_counter(), time.process_time()
            model(ids)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    return sorted(walls)[1], sorted(cpus)[1]


def encode(tokenizer, rows: list[dict[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per example."""
    eos = tokenizer.eos_token_id
    return [(render_prompt(tokenizer, row["prompt"]),
             tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [eos])
            for row in rows]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding)."""
    width = max(len(p) + len(c) for p, c in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)  # (B, T)
    for i, (prompt, completion) in enumerate(examples):
        n, m = len(prompt), len(completion)
        input_ids[i, :n + m] = torch.tensor(prompt + completion)
        attention_mask[i, :n + m] = 1
        labels[i, n:n + m] = torch.tensor(completion)
    return input_ids, attention_mask, labels


def batches(examples, batch_size: int, seed: int):
    """Endless shuffled batches, reshuffled every epoch."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


def train(model, tokenizer, examples, args) -> dict[str, float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, round(args.warmup * args.steps))

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    model.train()
    start, cpu_start, tokens, recent = time.perf_counter(), time.process_time(), 0, []
    stream = batches(examples, args.batch_size, args.seed)
    for step in range(args.steps):
        input_ids, attention_mask, labels = collate(next(stream), tokenizer.pad_token_id)
        loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(attention_mask.sum())
        recent.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            print(f"step {step + 1:4d}/{args.steps}  loss {sum(recent) / len(recent):.4f}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}  elapsed {elapsed:6.1f} s  "
                  f"({(step + 1) / elapsed:.3f} steps/s; cpu {cpu:.0f} s, idle estimate "
                  f"{cpu * args.to_idle:.0f} s)", flush=True)
            recent = []
    elapsed = time.perf_counter() - start
    return {"train_s": elapsed, "steps_per_s": args.steps / elapsed, "tokens": tokens,
            "train_cpu_s": time.process_time() - cpu_start}


def evaluate(model, tokenizer, rows, args, label: str) -> float:
    start, cpu = time.perf_counter(), time.process_time()
    predictions = greedy_completions(model, tokenizer, [r["prompt"] for r in rows],
                                     max_new_tokens=args.max_new_tokens, batch_size=16)
    score = exact_match(predictions, [r["completion"] for r in rows])
    print(f"{label}: exact match {score:.1%} on {len(rows)} examples "
          f"({time.perf_counter() - start:.1f} s wall, idle estimate "
          f"{(time.process_time() - cpu) * args.to_idle:.1f} s)", flush=True)
    for prediction, row in list(zip(predictions, rows))[:args.show]:
        mark = "ok " if prediction == row["completion"] else "BAD"
        print(f"  {mark} {prediction!r}\n      want {row['completion']!r}")
    return score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--show", type=int, default=6, help="predictions to print per eval")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads (1 gives steadier CPU-time figures on a busy machine)")
    parser.add_argument("--skip-base", action="store_true", help="do not score the base model")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    model, tokenizer = splice.load_model("smollm2-135m")
    train_rows, eval_rows = read_jsonl(args.data / "train.jsonl"), read_jsonl(args.data / "eval.jsonl")
    examples = encode(tokenizer, train_rows)
    lengths = [len(p) + len(c) for p, c in examples]
    reference, reference_cpu = reference_forward_s(model)
    to_idle = IDLE_REFERENCE_S / reference_cpu  # CPU seconds here -> idle 2-thread wall seconds
    args.to_idle = to_idle
    print(f"{len(train_rows)} train / {len(eval_rows)} eval examples; tokens per example: mean "
          f"{sum(lengths) / len(lengths):.1f}, max {max(lengths)}; reference forward "
          f"{reference:.2f} s wall, {reference_cpu:.2f} s CPU (idle 2-thread machine: "
          f"{IDLE_REFERENCE_S} s wall)", flush=True)

    base = None if args.skip_base else evaluate(model, tokenizer, eval_rows, args, "base")
    splice.attach(model, splice.LoRAConfig(rank=args.rank, alpha=args.alpha,
                                           target_modules="all-linear"))
    print(f"trainable: {splice.count_trainable(model)}", flush=True)
    stats = train(model, tokenizer, examples, args)
    adapter = evaluate(model, tokenizer, eval_rows, args, "adapter")
    total = time.perf_counter() - started
    print(json.dumps({"base_em": base, "adapter_em": adapter, "steps": args.steps,
                      "batch_size": args.batch_size, "lr": args.lr, "rank": args.rank,
                      "train_s": round(stats["train_s"], 1),
                      "steps_per_s": round(stats["steps_per_s"], 3),
                      "train_cpu_s": round(stats["train_cpu_s"], 1),
                      "train_idle_estimate_s": round(stats["train_cpu_s"] * to_idle, 1),
                      "train_tokens": stats["tokens"], "reference_forward_s": round(reference, 2),
                      "reference_forward_cpu_s": round(reference_cpu, 2),
                      "total_s": round(total, 1)}))


if __name__ == "__main__":
    main()

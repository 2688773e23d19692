"""The memory planner against measurement: SmolLM2-135M trained for a few steps by splice.

    .venv/bin/python bench/plan_validation.py [--quick] [--steps 3] [--seq 128] [--batches 1,4]
    .venv/bin/python bench/plan_validation.py --child lora --batches 1,2 --seq 64   # one process

For each method (full, lora, qlora), batch size and gradient-checkpointing setting, a fresh
subprocess imports torch and splice, notes its RSS, loads the model, prepares it as `splice
train` does (`splice.train.run.prepare_model`: NF4 quantization, LoRA r=8 all-linear, or every
weight trainable), and runs `splice.train.loop.train_step` (the chunked fused loss, gradient
clipping, AdamW over the trainable parameters) on random token ids, every token supervised,
fp32. The measured figure is the process's peak resident memory during training (VmHWM, reset
with /proc/self/clear_refs once the model is prepared) minus its RSS before loading: the bytes
of weights, optimizer state, gradients and activations the run held at its peak.

Why RSS and not an allocator counter: torch's CPU allocator keeps no peak statistics, and RSS
is what the operating system actually charges the process. glibc keeps freed heap for reuse,
which would add fragmentation the planner does not model, so the runs set
MALLOC_MMAP_THRESHOLD_=65536: every buffer over 64 KiB gets its own mapping, returned on free,
and RSS follows the live tensors (what a GPU allocator's "allocated" peak reports; at 1 MiB the
per-token tensors of small batches still fragment the heap, by a third of the activations).
Pass --glibc-default to see the figures with glibc's own heap policy. Before the baseline, the
process trains one step of a tiny random Llama the same way, so that the library code the
training touches is already resident and is not counted as training memory.

Each run is compared with `splice.plan.plan_memory(shape_from_model(model), ...)` with the same
settings in fp32. Writes bench/results/plan_validation.json (plan_validation_quick.json for
--quick) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

MODEL = "smollm2-135m"
RANK = 8
METHODS = ("full", "lora", "qlora")
RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20
MMAP_THRESHOLD = 64 * 1024


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak() -> None:
    """Return freed heap to the OS, then restart the kernel's high-water mark at current RSS."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def train_config(method: str, steps: int, grad_checkpointing: bool):
    from splice.config.train import AdapterSection, DataSection, TrainConfig, TrainSection

    return TrainConfig(model=MODEL, data=DataSection(path="unused.jsonl"),
                       adapter=AdapterSection(method=method, rank=RANK, dropout=0.0),
                       train=TrainSection(steps=steps, lr=1e-5,
                                          grad_checkpointing=grad_checkpointing))


def train_steps(model, config, batches: list[int], seq: int, steps: int):
    """Prepare `model` as `splice train` does, then yield after `steps` steps of each batch size
    (random token ids, every token supervised), restarting the peak before each size."""
    import torch

    from splice.train.batching import Batch
    from splice.train.distributed import DistContext
    from splice.train.loop import new_state, train_step
    from splice.train.run import prepare_model

    prepare_model(model, config)
    model.train()
    dist = DistContext()
    state = new_state(model, config, num_batches=config.train.steps, dist=dist)
    for batch in batches:
        ids = torch.randint(3, model.config.vocab_size, (batch, seq),
                            generator=torch.Generator().manual_seed(0))              # (B, T)
        group = [Batch(ids, torch.ones_like(ids), ids.clone(), batch * seq, batch * (seq - 1))]
        reset_peak()
        losses = [train_step(state, group, config, dist)["loss"] for _ in range(steps)]
        yield batch, losses


def warm_up(method: str, grad_checkpointing: bool) -> None:
    """One step of a tiny random Llama, trained the same way, then dropped."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=True))
    for _ in train_steps(tiny, train_config(method, 1, grad_checkpointing), [2], 16, 1):
        pass


def run_child(method: str, batches: list[int], seq: int, steps: int, grad_checkpointing: bool,
              threads: int) -> list[dict]:
    """In this fresh process: load and prepare the model once, then measure and plan each batch
    size in turn (smallest first), restarting the high-water mark before each."""
    import torch

    from splice.models import load_model
    from splice.plan import plan_memory, shape_from_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    warm_up(method, grad_checkpointing)
    reset_peak()
    baseline = status_kib("VmRSS")
    model, tokenizer = load_model(MODEL)
    del tokenizer
    shape = shape_from_model(model, MODEL)
    config = train_config(method, steps * len(batches), grad_checkpointing)
    rows = []
    for batch, losses in train_steps(model, config, sorted(batches), seq, steps):
        measured = (status_kib("VmHWM") - baseline) * 1024
        plan = plan_memory(shape, method, rank=RANK, batch=batch, seq=seq, dtype="fp32",
                           grad_checkpointing=grad_checkpointing, optimizer=config.train.optimizer,
                           loss_chunk=config.train.loss_chunk)
        rows.append({"method": method, "batch": batch, "seq": seq,
                     "grad_checkpointing": grad_checkpointing, "measured_bytes": measured,
                     "planned_bytes": plan.total, "ratio": plan.total / measured,
                     "plan": asdict(plan), "losses": losses})
    return rows


def spawn(method: str, batches: list[int], seq: int, steps: int, grad_checkpointing: bool,
          threads: int, glibc_default: bool = False) -> list[dict]:
    """Measurements of one method in a fresh subprocess (other methods' peaks never mix in)."""
    cmd = [sys.executable, __file__, "--child", method, "--batches", ",".join(map(str, batches)),
           "--seq", str(seq), "--steps", str(steps), "--threads", str(threads)]
    cmd += ["--grad-checkpointing"] if grad_checkpointing else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_WAIT_POLICY": "PASSIVE"}
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{method} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'method':<7}{'batch':>6}{'seq':>5}{'ckpt':>6}{'measured MiB':>14}"
             f"{'planned MiB':>13}{'plan/meas':>11}"]
    for r in rows:
        lines.append(f"{r['method']:<7}{r['batch']:>6}{r['seq']:>5}"
                     f"{'yes' if r['grad_checkpointing'] else 'no':>6}"
                     f"{r['measured_bytes'] / MIB:>14.0f}{r['planned_bytes'] / MIB:>13.0f}"
                     f"{r['ratio']:>11.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1,2 at 64 tokens, 2 steps, "
                        "no checkpointing runs")
    parser.add_argument("--batches", default="1,4", help="comma list of batch sizes")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="training steps per run (the peak "
                        "comes from the second on, once the optimizer state exists)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--glibc-default", action="store_true",
                        help="leave MALLOC_MMAP_THRESHOLD_ unset (RSS then includes freed heap)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--grad-checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, [int(b) for b in args.batches.split(",")],
                                   args.seq, args.steps, args.grad_checkpointing, args.threads)))
        return
    batches = [1, 2] if args.quick else [int(b) for b in args.batches.split(",")]
    seq, steps = (64, 2) if args.quick else (args.seq, args.steps)
    checkpointing = (False,) if args.quick else (False, True)
    rows = []
    for gc in checkpointing:
        for method in METHODS:
            runs = spawn(method, batches, seq, steps, gc, args.threads, args.glibc_default)
            print("\n".join(format_rows(runs).splitlines()[1:]), file=sys.stderr, flush=True)
            rows += runs
    print(f"SmolLM2-135M, fp32, LoRA r={RANK} all-linear, AdamW, {steps} steps, "
          f"{'glibc default heap' if args.glibc_default else 'MALLOC_MMAP_THRESHOLD_=64KiB'}")
    print(format_rows(rows))
    RESULTS.mkdir(exist_ok=True)
    name = "plan_validation_quick.json" if args.quick else "plan_validation.json"
    settings = {"batches": batches, "seq": seq, "steps": steps, "threads": args.threads,
                "rank": RANK, "glibc_default": args.glibc_default}
    (RESULTS / name).write_text(json.dumps({"settings": settings, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

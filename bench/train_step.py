"""LoRA training step on SmolLM2-135M: splice vs peft vs the frozen-model floor, time and peak RSS.

    .venv/bin/python bench/train_step.py [--quick] [--reps 3] [--steps 5] [--warmup 1]
    .venv/bin/python bench/train_step.py --only splice,qlora

Setup: all-linear LoRA, rank 16, alpha 32, dropout 0, fp32, 2 threads, batch 4 × 256 random
token ids (seed 0), every token supervised, model.train(), AdamW over the trainable parameters.

    splice  splice.attach(...) + splice.train.loss.causal_lm_loss(..., chunk_size=256)
    peft    peft.get_peft_model(...) + model(input_ids, attention_mask, labels=labels).loss
    floor   the frozen model (no adapters, no parameter gradients): forward from input
            embeddings that require grad, splice's fused loss, backward to the embeddings only.
            No optimizer. The least work any adapter method can do per step.
    qlora   the splice contender on a base whose linear layers are NF4 (splice.quant.
            quantize_model): the QLoRA benchmark, `--only splice,qlora` (ratios against splice).

Each contender runs in its own fresh subprocess; the runs alternate (splice, peft, floor,
splice, peft, floor, ...) so machine noise hits them alike. "step s" is the median wall time of
the timed steps (after warm-up) of every run of a contender, "cpu s" the median process CPU time
(user + sys, all threads) of the same steps, steadier than wall time on a shared machine;
time_vs_peft_per_round in the JSON gives the ratio within each alternation round. Peak RSS is
getrusage's ru_maxrss at the end of a run (the whole process: imports, weights, training),
"after load" is the RSS once the model is loaded and adapted (the safetensors weights are
mmapped, so part of them is faulted in only by the first step), and "overhead" = peak − after
load. Medians over the runs.

The runs get OMP_WAIT_POLICY=PASSIVE (--omp-wait-policy): on an oversubscribed machine, idle
OpenMP threads that spin make 2-thread steps several times slower and far noisier. ru_maxrss
includes what glibc keeps on its heap after frees; to see live memory instead, run with
MALLOC_MMAP_THRESHOLD_=1048576 in the environment (every buffer over 1 MiB is then its own mmap,
returned on free).

Writes bench/results/train_step.json, train_step_<names>.json for --only; --quick adds _quick
(bench/common.py: $SPLICE_BENCH_RESULTS moves the folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_env, peak_rss_mb, rss_mb, write_json  # noqa: E402

MODEL = "smollm2-135m"
RANK, ALPHA, CHUNK = 16, 32, 256
CONTENDERS = ("splice", "peft", "floor", "qlora")
DEFAULT_CONTENDERS = ("splice", "peft", "floor")


def reset_peak_rss() -> None:
    """Start the kernel's high-water mark (VmHWM) afresh, after returning freed heap to the OS,
    so `hwm_mb` measures the training steps alone, not the loading before them."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def build(contender: str):
    """(model, step function, attention implementation) for one contender."""
    import torch

    import splice

    model, _ = splice.load_model(MODEL)
    if contender == "qlora":
        from splice.quant import quantize_model

        quantize_model(model)
    if contender in ("splice", "qlora"):
        splice.attach(model, splice.LoRAConfig(rank=RANK, alpha=ALPHA, dropout=0.0,
                                               target_modules="all-linear"))
        from splice.train.loss import causal_lm_loss

        def loss_fn(ids, mask, labels):
            return causal_lm_loss(model, ids, mask, labels, chunk_size=CHUNK)
    elif contender == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear"))

        def loss_fn(ids, mask, labels):
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss
    else:
        from splice.train.loss import linear_cross_entropy

        model.requires_grad_(False)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()

        def loss_fn(ids, mask, labels):
            x = embed(ids).detach().requires_grad_(True)                      # (B, T, d)
            hidden = model.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
            rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])               # (B·(T-1), d)
            return linear_cross_entropy(rows, head.weight, labels[:, 1:].reshape(-1),
                                        chunk_size=CHUNK)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step(ids, mask, labels) -> float:
        if optimizer:
            optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(ids, mask, labels)
        loss.backward()
        if optimizer:
            optimizer.step()
        return loss.item()

    attn = getattr(model.config, "_attn_implementation", None)
    return model, step, attn, sum(p.numel() for p in params)


def print_profile(contender: str, step, ids, mask, labels) -> None:
    """torch.profiler's top ops (by self CPU time) and memory of one more step, to stderr."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(ids, mask, labels)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(f"== {contender}\n{table}", file=sys.stderr)


def run_child(contender: str, batch: int, seq: int, steps: int, warmup: int,
              threads: int, profile: bool = False) -> dict:
    """In this fresh process: load, adapt, train `warmup + steps` steps, report."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, step, attn, trainable = build(contender)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)               # (B, T)
    mask = torch.ones_like(ids)
    labels = ids.clone()                                                      # all supervised
    after_load = rss_mb()
    peak_at_load = peak_rss_mb()
    reset_peak_rss()
    times, cpu_times, losses = [], [], []
    for i in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(ids, mask, labels))
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = peak_rss_mb()
    train_peak = hwm_mb()
    if profile:
        print_profile(contender, step, ids, mask, labels)
    return {"contender": contender, "times_s": times, "cpu_s": cpu_times, "losses": losses,
            "attn": attn,
            "trainable": trainable, "after_load_mb": after_load, "peak_at_load_mb": peak_at_load,
            "peak_mb": peak, "overhead_mb": peak - after_load, "train_peak_mb": train_peak}


def spawn(contender: str, args: argparse.Namespace) -> dict:
    if args.quick:  # a smoke run: one process, so its memory figures mean nothing
        return run_child(contender, args.batch, args.seq, args.steps, args.warmup, args.threads)
    cmd = [sys.executable, __file__, "--child", contender, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)] + (["--profile"] if args.profile else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.omp_wait_policy))
    if out.returncode:
        raise RuntimeError(f"{contender} run failed:\n{out.stderr[-4000:]}")
    if args.profile:
        print(out.stderr[out.stderr.find("== "):], file=sys.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict]) -> dict:
    by = {c: [r for r in runs if r["contender"] == c] for c in CONTENDERS}
    run_medians = {c: [statistics.median(r["times_s"]) for r in rs] for c, rs in by.items()}
    out = {}
    for c, rs in by.items():
        if not rs:
            continue
        out[c] = {
            "step_s": statistics.median(t for r in rs for t in r["times_s"]),
            "step_s_per_run": run_medians[c],
            # the ratio within each alternation round (runs next to each other in time)
            "time_vs_peft_per_round": [t / p for t, p in zip(run_medians[c], run_medians["peft"])]
            if run_medians.get("peft") else None,
            "time_vs_splice_per_round": [t / p for t, p in zip(run_medians[c], run_medians["splice"])]
            if run_medians.get("splice") else None,
            "cpu_s": statistics.median(t for r in rs for t in r["cpu_s"]),
            "peak_mb": statistics.median(r["peak_mb"] for r in rs),
            "after_load_mb": statistics.median(r["after_load_mb"] for r in rs),
            "overhead_mb": statistics.median(r["overhead_mb"] for r in rs),
            "train_peak_mb": statistics.median(r["train_peak_mb"] for r in rs),
            "first_loss": rs[0]["losses"][0], "attn": rs[0]["attn"],
            "trainable": rs[0]["trainable"],
        }
    return out


def print_table(summary: dict, title: str, ref_name: str) -> None:
    ref = summary[ref_name]
    print(title)
    r = ref_name
    print(f"{'':<8}{'step s':>8}{'cpu s':>8}{'peak MB':>9}{'overhead MB':>13}{'time/' + r:>13}"
          f"{'cpu/' + r:>12}{'peak/' + r:>13}{'ovh/' + r:>12}{'train peak MB':>15}  attn, first loss")
    for c, s in summary.items():
        print(f"{c:<8}{s['step_s']:>8.3f}{s['cpu_s']:>8.3f}{s['peak_mb']:>9.0f}"
              f"{s['overhead_mb']:>13.0f}{s['step_s'] / ref['step_s']:>13.2f}"
              f"{s['cpu_s'] / ref['cpu_s']:>12.2f}{s['peak_mb'] / ref['peak_mb']:>13.2f}"
              f"{s['overhead_mb'] / ref['overhead_mb']:>12.2f}{s['train_peak_mb']:>15.0f}"
              f"  {s['attn']}, {s['first_loss']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1×64 tokens, 2 steps, 1 rep, every contender in this "
                             "one process (its memory figures then mean nothing)")
    parser.add_argument("--reps", type=int, default=3,
                        help="fresh runs per contender (alternating)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY for the runs ('' keeps the environment's); PASSIVE "
                             "stops idle OpenMP threads spinning, which on a shared, "
                             "oversubscribed machine otherwise inflates step times several-fold")
    parser.add_argument("--only", default=",".join(DEFAULT_CONTENDERS),
                        help=f"comma list of contenders from {', '.join(CONTENDERS)} (qlora: the "
                             "splice contender on an NF4 base; `--only splice,qlora` is the QLoRA "
                             "benchmark)")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top ops of one extra step per run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.batch, args.seq, args.steps, args.warmup,
                                   args.threads, args.profile)))
        return
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup, args.reps = 1, 64, 2, 1, 1
    order = [c for c in CONTENDERS if c in args.only.split(",")]
    runs = []
    for rep in range(args.reps):
        for c in order:
            runs.append(spawn(c, args))
            step = statistics.median(runs[-1]["times_s"])
            print(f"rep {rep + 1}/{args.reps} {c}: step {step:.3f} s, "
                  f"peak {runs[-1]['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    summary = summarize(runs)
    title = (f"LoRA r={RANK} all-linear on {MODEL}, batch {args.batch}×{args.seq}, fp32, "
             f"{args.threads} threads, OMP_WAIT_POLICY={args.omp_wait_policy or 'unset'}, "
             f"median of {args.reps}×{args.steps} steps")
    print_table(summary, title, "peft" if "peft" in summary else order[0])
    name = ("train_step" if order == list(DEFAULT_CONTENDERS)
            else f"train_step_{'_'.join(order)}")
    settings = {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup", "reps", "threads",
                                              "omp_wait_policy", "quick")}
    write_json(name, {"settings": settings, "summary": summary, "runs": runs}, args.quick)


if __name__ == "__main__":
    main()

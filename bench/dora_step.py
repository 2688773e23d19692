"""DoRA training step on SmolLM2-135M: splice vs peft; then inference after merge_and_unload.

    .venv/bin/python bench/dora_step.py [--quick] [--reps 2] [--steps 2] [--warmup 1]
                                        [--only splice,peft,splice-lora,peft-lora,layers,merged]

Setup as bench/train_step.py: all-linear, rank 16, alpha 32, dropout 0, fp32, 2 threads,
batch 4 × 256 random token ids (seed 0), every token supervised, model.train(), AdamW.

    splice       splice.attach(model, DoRAConfig(...))
    peft         get_peft_model(model, LoraConfig(..., use_dora=True))
    splice-lora  splice.attach(model, LoRAConfig(...))            (reference)
    peft-lora    get_peft_model(model, LoraConfig(...))           (reference)

Every contender computes its loss with splice.train.loss.causal_lm_loss (chunked, no full
logits), so the step times differ only in the adapter layers. Each run is a fresh subprocess;
the runs alternate (splice, peft, splice-lora, peft-lora, splice, ...). "time/peft" is the
median over rounds of a contender's run median / its peft counterpart's run median within the
round (neighbours in time share the machine's noise); "cpu/peft" the same for process CPU time
(user + sys, all threads), steadier than wall time on a shared machine. "time/lora" is what
DoRA costs over LoRA in the same library. The LoRA runs give the context for the ratio: a DoRA
step cannot cost less than the LoRA step it extends.

"layers" (one run): forward + backward of a single adapted linear of each SmolLM2 shape on
batch·seq rows, every variant and the frozen layer alternating; the DoRA layer's own cost,
without the attention, norms and loss every step shares.

"merged" (one run): a DoRA adapter with perturbed A, B and m, folded with merge_and_unload,
against the plain base model: no-grad forward of the same batch, timed alternately; it also
reports the largest logit difference between the adapter before and after the merge.

Writes bench/results/dora_step.json (dora_step_<names>.json for --only; --quick adds _quick and
runs every contender in one process).
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
from train_step import ALPHA, CHUNK, MODEL, RANK  # noqa: E402

TRAINERS = ("splice", "peft", "splice-lora", "peft-lora")
DEFAULT = TRAINERS + ("layers", "merged")


def build(contender: str):
    """(model, step function, trainable parameter count) for one training contender."""
    import torch

    import splice
    from splice.train.loss import causal_lm_loss

    model, _ = splice.load_model(MODEL)
    dora = not contender.endswith("-lora")
    if contender.startswith("splice"):
        config_cls = splice.DoRAConfig if dora else splice.LoRAConfig
        splice.attach(model, config_cls(rank=RANK, alpha=ALPHA, dropout=0.0,
                                        target_modules="all-linear"))
        lm = model
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules="all-linear", use_dora=dora))
        lm = model.base_model.model                     # the adapted *ForCausalLM inside
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(ids, mask, labels) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = causal_lm_loss(lm, ids, mask, labels, chunk_size=CHUNK)
        loss.backward()
        optimizer.step()
        return loss.item()

    return model, step, sum(p.numel() for p in params)


def batch(vocab: int, size: int, seq: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (size, seq), generator=gen)                 # (B, T)
    return ids, torch.ones_like(ids), ids.clone()


def run_trainer(contender: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, step, trainable = build(contender)
    ids, mask, labels = batch(model.config.vocab_size, args.batch, args.seq)
    after_load = rss_mb()
    times, cpu_times, losses = [], [], []
    for i in range(args.warmup + args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step(ids, mask, labels))
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    peak = peak_rss_mb()
    return {"contender": contender, "times_s": times, "cpu_s": cpu_times, "losses": losses,
            "trainable": trainable, "after_load_mb": after_load, "peak_mb": peak}


def run_merged(args: argparse.Namespace) -> dict:
    """Forward time of a merged DoRA model vs the plain base, alternating, in one process."""
    import copy

    import torch

    import splice

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # A's init
    base, _ = splice.load_model(MODEL)
    base.eval()
    model = copy.deepcopy(base)
    splice.attach(model, splice.DoRAConfig(rank=RANK, alpha=ALPHA, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # A, B and m: the merge then changes every weight
                param.add_(torch.randn(param.shape, generator=gen) * 0.01)
    ids, mask, _ = batch(base.config.vocab_size, args.batch, args.seq)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        merged = splice.merge_and_unload(model)
        after = merged(input_ids=ids, attention_mask=mask).logits
    diff = (after - before).abs().max().item()
    del before, after
    times = {"base": [], "merged": []}
    with torch.no_grad():
        for i in range(args.warmup + 3 * args.steps):  # forwards are short: more pairs
            for label, m in (("base", base), ("merged", merged)):
                start = time.perf_counter()
                m(input_ids=ids, attention_mask=mask)
                if i >= args.warmup:
                    times[label].append(time.perf_counter() - start)
    ratios = [t / b for t, b in zip(times["merged"], times["base"])]
    return {"contender": "merged", "times_s": times, "merged_vs_base_per_pair": ratios,
            "merged_vs_base": statistics.median(ratios), "max_logit_diff_vs_unmerged": diff,
            "plain_model": type(merged).__name__,
            "same_parameter_count": sum(p.numel() for p in merged.parameters())
            == sum(p.numel() for p in base.parameters())}


# (in, out, count per transformer layer): q/o, k/v, gate/up, down
LAYER_SHAPES = ((576, 576, 2), (576, 192, 2), (576, 1536, 2), (1536, 576, 1))
LAYER_VARIANTS = ("splice", "peft", "splice-lora", "peft-lora", "frozen")


def adapted_linear(variant: str, linear):
    """One SmolLM2-shaped linear as each contender adapts it (returns the module to call)."""
    import copy

    from torch import nn

    import splice

    holder = nn.Module()
    holder.proj = copy.deepcopy(linear)
    if variant == "frozen":
        return holder.proj.requires_grad_(False)
    if variant.startswith("splice"):
        config_cls = splice.LoRAConfig if variant.endswith("-lora") else splice.DoRAConfig
        splice.attach(holder, config_cls(rank=RANK, alpha=ALPHA, target_modules=["proj"]))
        return holder.proj
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(holder, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["proj"],
                                              use_dora=not variant.endswith("-lora")))
    return model.base_model.model.proj


def run_layers(args: argparse.Namespace) -> dict:
    """Forward + backward of one adapted linear per SmolLM2 shape, variants alternating."""
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = args.batch * args.seq
    per_shape = {}
    for d_in, d_out, count in LAYER_SHAPES:
        linear = nn.Linear(d_in, d_out, bias=False)
        layers = {v: adapted_linear(v, linear) for v in LAYER_VARIANTS}
        x = torch.randn(rows, d_in, requires_grad=True)                    # (n, in)
        grad = torch.randn(rows, d_out)                                   # (n, out)
        times = {v: [] for v in LAYER_VARIANTS}
        for i in range(2 + 5 * args.steps):
            for v, layer in layers.items():
                start = time.perf_counter()
                layer(x).backward(grad)
                if i >= 2:
                    times[v].append(time.perf_counter() - start)
        per_shape[f"{d_in}x{d_out}"] = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
    # ms per transformer layer: each shape times how often it occurs
    block = {v: sum(per_shape[f"{i}x{o}"][v] * c for i, o, c in LAYER_SHAPES)
             for v in LAYER_VARIANTS}
    extra = {v: block[v] - block["frozen"] for v in LAYER_VARIANTS}
    return {"contender": "layers", "ms_per_shape": per_shape, "ms_per_block": block,
            "dora_vs_peft": block["splice"] / block["peft"],
            "dora_extra_vs_peft_extra": extra["splice"] / extra["peft"],
            "note": "ms of forward + backward (to x and the adapter) on (batch·seq, in) rows; "
                    "'extra' is over the frozen base layer"}


def run_contender(contender: str, args: argparse.Namespace) -> dict:
    runner = {"merged": run_merged, "layers": run_layers}.get(contender)
    return runner(args) if runner else run_trainer(contender, args)


def spawn(contender: str, args: argparse.Namespace) -> dict:
    if args.quick:  # a smoke run: one process, so its memory figures mean nothing
        return run_contender(contender, args)
    cmd = [sys.executable, __file__, "--child", contender] + [
        f"--{k}={getattr(args, k)}" for k in ("batch", "seq", "steps", "warmup", "threads")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_env(args.omp_wait_policy))
    if out.returncode:
        raise RuntimeError(f"{contender} run failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_round(runs: list[dict], contender: str, key: str) -> list[float]:
    """The run medians of `key` for one contender, in alternation order."""
    return [statistics.median(r[key]) for r in runs if r["contender"] == contender]


def summarize(runs: list[dict]) -> dict:
    trainers = [c for c in TRAINERS if any(r["contender"] == c for r in runs)]
    out: dict = {}
    for c in trainers:
        rs = [r for r in runs if r["contender"] == c]
        ref = "peft-lora" if c.endswith("-lora") else "peft"
        entry = {"step_s": statistics.median(t for r in rs for t in r["times_s"]),
                 "step_s_per_run": per_round(runs, c, "times_s"),
                 "cpu_s": statistics.median(t for r in rs for t in r["cpu_s"]),
                 "peak_mb": statistics.median(r["peak_mb"] for r in rs),
                 "first_loss": rs[0]["losses"][0], "trainable": rs[0]["trainable"]}
        if ref in trainers:
            # ratios within each alternation round, then their median
            for key, label in (("times_s", "time"), ("cpu_s", "cpu")):
                ratios = [a / b for a, b in zip(per_round(runs, c, key), per_round(runs, ref, key))]
                entry[f"{label}_vs_{ref}_per_round"] = ratios
                entry[f"{label}_vs_{ref}"] = statistics.median(ratios)
        out[c] = entry
    for lib in ("splice", "peft"):  # what DoRA costs over LoRA in the same library
        if lib in out and f"{lib}-lora" in out:
            out[lib]["time_vs_own_lora"] = out[lib]["step_s"] / out[f"{lib}-lora"]["step_s"]
            out[lib]["cpu_vs_own_lora"] = out[lib]["cpu_s"] / out[f"{lib}-lora"]["cpu_s"]
    for extra in ("layers", "merged"):
        found = [r for r in runs if r["contender"] == extra]
        if found:
            out[extra] = {k: v for k, v in found[0].items() if k != "contender"}
    return out


def print_summary(summary: dict, title: str) -> None:
    print(title)
    print(f"{'':<13}{'step s':>8}{'cpu s':>8}{'peak MB':>9}{'time/peft':>11}{'cpu/peft':>10}"
          f"{'time/lora':>11}{'cpu/lora':>10}  first loss")

    def cell(value, width):
        return f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"

    for c in TRAINERS:
        if c in summary:
            s = summary[c]
            ref = "peft-lora" if c.endswith("-lora") else "peft"
            print(f"{c:<13}{s['step_s']:>8.3f}{s['cpu_s']:>8.3f}{s['peak_mb']:>9.0f}"
                  f"{cell(s.get(f'time_vs_{ref}'), 11)}{cell(s.get(f'cpu_vs_{ref}'), 10)}"
                  f"{cell(s.get('time_vs_own_lora'), 11)}{cell(s.get('cpu_vs_own_lora'), 10)}"
                  f"  {s['first_loss']:.4f}")
    print("time/peft, cpu/peft: medians over alternation rounds of the run-median ratio against "
          "peft's same method; time/lora, cpu/lora: DoRA against LoRA in the same library")
    if "layers" in summary:
        s = summary["layers"]
        print("one layer of each shape, forward + backward, ms per transformer block (7 linears):")
        print("  " + ", ".join(f"{v} {ms:.1f}" for v, ms in s["ms_per_block"].items()))
        print(f"  splice DoRA / peft DoRA {s['dora_vs_peft']:.2f}; their cost over the frozen "
              f"layer: {s['dora_extra_vs_peft_extra']:.2f}")
    if "merged" in summary:
        m = summary["merged"]
        print(f"merged forward / base forward: {m['merged_vs_base']:.3f} (per pair "
              f"{', '.join(f'{r:.2f}' for r in m['merged_vs_base_per_pair'])}); max |logit diff| "
              f"merged vs unmerged {m['max_logit_diff_vs_unmerged']:.2e}; {m['plain_model']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1×64 tokens, 1 rep, every contender in this one process")
    parser.add_argument("--reps", type=int, default=2, help="fresh runs per trainer (alternating)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (or forwards) per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY for the runs ('' keeps the environment's); see "
                             "bench/train_step.py")
    parser.add_argument("--only", default=",".join(DEFAULT),
                        help=f"comma list of {', '.join(DEFAULT)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_contender(args.child, args)))
        return
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup, args.reps = 1, 64, 2, 1, 1
    chosen = args.only.split(",")
    order = [c for c in TRAINERS if c in chosen]
    runs = []
    for rep in range(args.reps):
        for c in order:
            runs.append(spawn(c, args))
            print(f"rep {rep + 1}/{args.reps} {c}: step "
                  f"{statistics.median(runs[-1]['times_s']):.3f} s", file=sys.stderr, flush=True)
    for extra in ("layers", "merged"):
        if extra in chosen:
            runs.append(spawn(extra, args))
    summary = summarize(runs)
    title = (f"DoRA r={RANK} all-linear on {MODEL}, batch {args.batch}×{args.seq}, fp32, "
             f"{args.threads} threads, OMP_WAIT_POLICY={args.omp_wait_policy or 'unset'}, "
             f"median of {args.reps}×{args.steps} steps")
    print_summary(summary, title)
    name = "dora_step" if set(chosen) == set(DEFAULT) else f"dora_step_{'_'.join(chosen)}"
    settings = {k: getattr(args, k) for k in ("batch", "seq", "steps", "warmup", "reps", "threads",
                                              "omp_wait_policy", "only", "quick")}
    write_json(name, {"settings": settings, "summary": summary, "runs": runs}, args.quick)


if __name__ == "__main__":
    main()

"""Loss curves of one small LoRA run under AdamW, PagedAdamW and AdamW8bit (and bitsandbytes'
AdamW8bit when it is installed), with each optimizer's measured state bytes and step time.

    .venv/bin/python bench/optimizer_curves.py [--quick] [--steps 24] [--batch 2] [--no-bnb]

Setup: SmolLM2-135M (fp32), LoRA rank 8 on all linears (seeded init), the first `--steps`
length-bucketed batches of data/demo/train.jsonl (batch 2, max 128 tokens, seed 0), splice's
chunked loss, peak lr 2e-3 with 10% warm-up then cosine decay, weight decay 0, 2 threads.

Every contender starts from the same adapter weights and sees the same batches. They run in
lockstep: at each step every contender, in turn, loads its own adapter weights into the one
model, does forward, backward and its optimizer step, and saves its weights back; so machine
noise hits them alike, and `step_time_vs_adamw` is the ratio of optimizer-step times within
each step (median over steps). "state bytes" is summed over the optimizer's state tensors
after the run (splice.optim.optimizer_state_bytes); PagedAdamW's live in host memory, the
others' on the parameters' device (here both are the CPU). AdamW8bit keeps fp32 state for
tensors under 4096 elements (the k/v LoRA B matrices, 192×8), hence above 2.03 bytes/param.
Timings are only comparable within one run; the JSON records the load average.

Writes bench/results/optimizer_curves.json and bench/results/optimizer_curves.png (--quick: 3
steps of batch 1, optimizer_curves_quick.json and .png).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads that spin slow a busy box

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import splice  # noqa: E402
from splice.optim import AdamW8bit, PagedAdamW, optimizer_state_bytes  # noqa: E402
from splice.train.batching import length_bucketed_batches  # noqa: E402
from splice.train.data import load_jsonl  # noqa: E402
from splice.train.loss import causal_lm_loss  # noqa: E402
from splice.train.schedule import make_scheduler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result_path, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "demo" / "train.jsonl"
LR, WARMUP, MAX_LEN, RANK = 2e-3, 0.1, 128, 8


def build_optimizers(params: list[torch.nn.Parameter], with_bnb: bool) -> dict:
    makers = {
        "adamw": lambda: torch.optim.AdamW(params, lr=LR, weight_decay=0.0),
        "paged_adamw": lambda: PagedAdamW(params, lr=LR, weight_decay=0.0),
        "adamw8bit": lambda: AdamW8bit(params, lr=LR, weight_decay=0.0),
    }
    if with_bnb:
        import bitsandbytes as bnb

        makers["bnb_adamw8bit"] = lambda: bnb.optim.AdamW8bit(params, lr=LR, weight_decay=0.0)
    return {name: make() for name, make in makers.items()}


class Contender:
    """One optimizer with its own copy of the adapter weights and its own schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, start: list[torch.Tensor], steps: int):
        self.optimizer = optimizer
        self.weights = [w.clone() for w in start]
        self.scheduler = make_scheduler(optimizer, steps, WARMUP)
        self.losses: list[float] = []
        self.step_s: list[float] = []
        self.optimizer_s: list[float] = []

    def train_step(self, model, params, batch) -> None:
        with torch.no_grad():
            for p, w in zip(params, self.weights):
                p.copy_(w)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model, batch.input_ids, batch.attention_mask, batch.labels,
                              chunk_size=256)
        loss.backward()
        before_step = time.perf_counter()
        self.optimizer.step()
        end = time.perf_counter()
        self.scheduler.step()
        self.losses.append(loss.item())
        self.step_s.append(end - start)
        self.optimizer_s.append(end - before_step)
        with torch.no_grad():
            for p, w in zip(params, self.weights):
                w.copy_(p)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, tokenizer = splice.load_model("smollm2-135m")
    torch.manual_seed(0)
    splice.attach(model, splice.LoRAConfig(rank=RANK, target_modules="all-linear"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    examples = load_jsonl(DATA, tokenizer, max_len=MAX_LEN).examples
    batches = length_bucketed_batches(examples, args.batch, seed=0, epoch=0,
                                      pad_token_id=tokenizer.pad_token_id)[: args.steps]
    start = [p.detach().clone() for p in params]
    contenders = {name: Contender(opt, start, args.steps)
                  for name, opt in build_optimizers(params, args.bnb).items()}
    for step, batch in enumerate(batches):
        for contender in contenders.values():
            contender.train_step(model, params, batch)
        print(f"step {step + 1:>3}/{len(batches)}  " + "  ".join(
            f"{name} {c.losses[-1]:.4f}" for name, c in contenders.items()), flush=True)
    return summarize(contenders, params, batches)


def summarize(contenders: dict, params: list[torch.nn.Parameter], batches: list) -> dict:
    ref = contenders["adamw"]
    largest = max(p.numel() * p.element_size() for p in params)
    out = {"setup": {"model": "smollm2-135m", "lora_rank": RANK, "targets": "all-linear",
                     "trainable": sum(p.numel() for p in params), "steps": len(batches),
                     "batch": batches[0].size, "max_len": MAX_LEN, "lr": LR,
                     "warmup_ratio": WARMUP, "threads": torch.get_num_threads(),
                     "tokens": sum(b.num_tokens for b in batches),
                     "load_avg_1min_at_end": os.getloadavg()[0]},
           "contenders": {}}
    for name, c in contenders.items():
        state_bytes = optimizer_state_bytes(c.optimizer)
        in_8bit = sum(p.numel() for p, entry in c.optimizer.state.items()
                      if any(torch.is_tensor(v) and v.dtype == torch.uint8 for v in entry.values()))
        out["contenders"][name] = {
            "losses": c.losses,
            "final_loss": c.losses[-1],
            "max_abs_dloss_vs_adamw": max(abs(a - b) for a, b in zip(c.losses, ref.losses)),
            "final_rel_dloss_vs_adamw": c.losses[-1] / ref.losses[-1] - 1,
            "state_bytes": state_bytes,
            "state_bytes_per_param": state_bytes / out["setup"]["trainable"],
            "params_with_8bit_state": in_8bit,
            "state_on": "host (paged in per parameter)" if name == "paged_adamw" else "device",
            "device_state_peak_bytes": 2 * largest if name == "paged_adamw" else state_bytes,
            "step_s_median": statistics.median(c.step_s),
            "optimizer_step_s_median": statistics.median(c.optimizer_s),
            "optimizer_step_time_vs_adamw": statistics.median(
                a / b for a, b in zip(c.optimizer_s, ref.optimizer_s)),
            "step_time_vs_adamw": statistics.median(
                a / b for a, b in zip(c.step_s, ref.step_s)),
        }
    return out


def plot(result: dict, path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), dpi=120, sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    ref = result["contenders"]["adamw"]["losses"]
    styles = {"adamw": "-", "paged_adamw": "--", "adamw8bit": "-", "bnb_adamw8bit": ":"}
    for name, c in result["contenders"].items():
        steps = range(1, len(c["losses"]) + 1)
        top.plot(steps, c["losses"], styles.get(name, "-"), label=name, linewidth=1.3)
        bottom.plot(steps, [a - b for a, b in zip(c["losses"], ref)], styles.get(name, "-"),
                    label=name, linewidth=1.3)
    setup = result["setup"]
    top.set_title(f"SmolLM2-135M, LoRA r={setup['lora_rank']} all-linear, "
                  f"batch {setup['batch']}, lr {setup['lr']}")
    top.set_ylabel("train loss (nats/token)")
    bottom.set_ylabel("loss − AdamW's")
    bottom.set_xlabel("optimizer step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_table(result: dict) -> None:
    setup = result["setup"]
    print(f"\n{setup['trainable']:,} trainable parameters, {setup['steps']} steps")
    print(f"{'':<15}{'final loss':>11}{'max|Δloss|':>12}{'state MB':>10}{'B/param':>9}"
          f"{'8-bit params':>14}{'opt step s':>12}{'opt/adamw':>11}{'step/adamw':>12}")
    for name, c in result["contenders"].items():
        print(f"{name:<15}{c['final_loss']:>11.4f}{c['max_abs_dloss_vs_adamw']:>12.2e}"
              f"{c['state_bytes'] / 2**20:>10.2f}{c['state_bytes_per_param']:>9.3f}"
              f"{c['params_with_8bit_state']:>14,}"
              f"{c['optimizer_step_s_median']:>12.4f}{c['optimizer_step_time_vs_adamw']:>11.2f}"
              f"{c['step_time_vs_adamw']:>12.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 steps of batch 1")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bnb", dest="bnb", action="store_false",
                        help="skip bitsandbytes' AdamW8bit (it is used if installed)")
    args = parser.parse_args()
    args.bnb = args.bnb and importlib.util.find_spec("bitsandbytes") is not None
    if args.quick:
        args.steps, args.batch = 3, 1
    started = time.perf_counter()
    result = run(args)
    result["setup"]["wall_s"] = time.perf_counter() - started
    result["setup"]["quick"] = args.quick
    path = write_json("optimizer_curves", result, args.quick)
    plot(result, result_path("optimizer_curves", args.quick, ".png"))
    print_table(result)
    print(f"wrote {path} and its .png ({result['setup']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()

"""LoRA initialisations on the demo task, same budget: held-out exact match, eval loss, the
training loss after N steps, and the loss curves.

    .venv/bin/python bench/inits.py [--only pissa,eva] [--steps N] [--quick]
                                    [--output-root /tmp/splice-inits]

Setup: presets/demo.yaml for every init (SmolLM2-135M fp32, data/demo: 1,000 training and 120
held-out prompt/completion records, LoRA rank 16 on all linears, alpha 32, lr 2e-3, batch 8,
60 steps, 10% warm-up then cosine decay, seed 0); only `--init` changes, so each row differs
from the default row by where A, B and the base start:

    .venv/bin/python -m splice train --config presets/demo.yaml --init INIT --output DIR \\
        --no-progress [train.steps=N]

eva and lora_ga read the run's first 4 training batches (`--init-batches`) before step 1; loftq
trains on the 4-bit base it makes (`--method qlora --init loftq`: the base is NF4 of W - s·B·A),
so its baseline is the row "qlora" (the same 4-bit training from the default init). Each run's
folder is <output-root>/<label>; a folder whose finished run had the same command is reused,
not retrained.

Columns: exact match on the held-out records (greedy), eval loss (nats per completion token),
the training loss at the last step and the mean of the last 10 steps (one batch each: noisy),
loss@2 the loss of step 2's batch, the first seen after an update (step 1's is the base
model's for every init: each leaves the model unchanged at step 0), wall time of the training
loop. The lr is the preset's (tuned for the default init); PiSSA and OLoRA start with
large A and B, and their papers train at a lower lr: the rows up to loftq are the same-budget
comparison, not each init at its best; the "-lr2e-4" rows show PiSSA, OLoRA, EVA and LoRA-GA
at a tenth of the lr. One seed per init.

--quick is a smoke run (4 steps, 4 held-out records); its figures mean nothing. Writes
bench/results/inits.json, inits.md and inits.png (--quick: inits_quick.*; the folder is
$SPLICE_BENCH_RESULTS when set, as for every benchmark: bench/common.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from splice.tables import format_table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_env, results_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRESET = "presets/demo.yaml"
PYTHON = ROOT / ".venv" / "bin" / "python"
QUICK_STEPS, QUICK_EVAL = 4, 4
# label -> (method, init, overrides). The "-lr2e-4" rows leave the same-budget rule on purpose:
# PiSSA and OLoRA start with A and B of the size of W's top part, LoRA-GA with both non-zero
# (scale ζ ≈ 1.2), and EVA's A reads the inputs' largest directions (a few hidden dimensions of
# an LLM are outliers), so the same Adam step moves their output far more than a kaiming-A,
# zero-B start; a 10x lower lr is the usual remedy. (Quick run, 4 steps at lr 2e-3 with no
# warm-up: the loss after the first update went from the base's 1.11 to 0.53 default, 9.9
# pissa, 20.7 olora, 8.3 eva, 7.9 lora_ga.)
RUNS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "default": ("lora", "default", ()), "gaussian": ("lora", "gaussian", ()),
    "pissa": ("lora", "pissa", ()), "olora": ("lora", "olora", ()), "eva": ("lora", "eva", ()),
    "lora_ga": ("lora", "lora_ga", ()), "qlora": ("qlora", "default", ()),
    "loftq": ("qlora", "loftq", ()),
    "pissa-lr2e-4": ("lora", "pissa", ("train.lr=2e-4",)),
    "olora-lr2e-4": ("lora", "olora", ("train.lr=2e-4",)),
    "eva-lr2e-4": ("lora", "eva", ("train.lr=2e-4",)),
    "lora_ga-lr2e-4": ("lora", "lora_ga", ("train.lr=2e-4",)),
}


def command_for(label: str, folder: Path, args: argparse.Namespace, eval_path: str | None) -> list[str]:
    method, init, extra = RUNS[label]
    python = str(PYTHON.relative_to(ROOT)) if PYTHON.exists() else sys.executable
    extra = list(extra)
    steps = QUICK_STEPS if args.quick else args.steps
    if steps:
        extra.append(f"train.steps={steps}")
    if eval_path:
        extra.append(f"data.eval_path={eval_path}")
    return [python, "-m", "splice", "train", "--config", PRESET, "--method", method, "--init", init,
            "--output", str(folder), "--no-progress", *extra]


def train(label: str, folder: Path, command: list[str]) -> dict[str, Any]:
    record_path = folder / "training.json"
    if record_path.is_file() and (folder / "bench-command.txt").is_file() and \
            (folder / "bench-command.txt").read_text() == shlex.join(command):
        print(f"[{label}] reusing {folder}", flush=True)
        return {"reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    # A run with another config must not resume from this folder's old checkpoints.
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    print(f"[{label}] {shlex.join(command)}", flush=True)
    env = child_env()
    start, load = time.perf_counter(), os.getloadavg()[0]
    with open(folder / "bench.log", "w") as log:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    run = {"returncode": code, "wall_s": round(time.perf_counter() - start, 1),
           "load_avg_1min": [load, os.getloadavg()[0]]}
    if code == 0:
        (folder / "bench-command.txt").write_text(shlex.join(command))
    else:
        run["error_tail"] = (folder / "bench.log").read_text().splitlines()[-20:]
    return run


def losses(folder: Path) -> list[tuple[int, float]]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def row(label: str, folder: Path, run: dict[str, Any]) -> dict[str, Any]:
    method, init, _ = RUNS[label]
    if run.get("returncode", 0) != 0:
        return {"label": label, "method": method, "init": init, "status": "failed", **run}
    m = json.loads((folder / "training.json").read_text())["metrics"]
    curve = losses(folder)
    tail = [loss for _, loss in curve[-10:]]
    return {"label": label, "method": method, "init": init, "status": "ok",
            "exact_match": m["exact_match"], "eval_loss": m["eval_loss"],
            "final_train_loss": m["final_train_loss"], "mean_last10_loss": sum(tail) / len(tail),
            "loss_after_first_update": curve[1][1] if len(curve) > 1 else None, "steps": m["steps"],
            "train_seconds": m["train_seconds"], "curve": curve, "output": str(folder), **run}


def table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    headers = ["init", "method", "exact match", "eval loss", "loss@2", "final loss",
               "mean last 10", "steps", "train s"]
    cells = []
    for r in rows:
        if r["status"] != "ok":
            cells.append([r["label"], r["method"], "failed", "", "", "", "", "", ""])
            continue
        cells.append([r["label"], r["method"],
                      "-" if r["exact_match"] is None else f"{100 * r['exact_match']:.1f}%",
                      "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}",
                      "-" if r["loss_after_first_update"] is None else f"{r['loss_after_first_update']:.4f}",
                      f"{r['final_train_loss']:.4f}",
                      f"{r['mean_last10_loss']:.4f}", str(r["steps"]), f"{r['train_seconds']:.0f}"])
    right = [False, False] + [True] * 7
    md = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if x else "---" for x in right) + "|"]
    md += ["| " + " | ".join(c) + " |" for c in cells]
    return format_table(headers, cells, right), "\n".join(md)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    # one colour per init; dashed: on the 4-bit base; dotted: at a tenth of the lr
    inits = list(dict.fromkeys(r["init"] for r in rows))
    colours = {init: plt.get_cmap("tab10")(i % 10) for i, init in enumerate(inits)}
    for r in rows:
        if r["status"] == "ok" and r["curve"]:
            steps, values = zip(*r["curve"])
            style = ":" if "-lr" in r["label"] else "--" if r["method"] == "qlora" else "-"
            colour = "black" if r["label"] == "qlora" else colours[r["init"]]
            ax.plot(steps, values, label=r["label"], linewidth=1.2, linestyle=style, color=colour)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token, one batch)")
    ax.set_yscale("log")
    ax.set_title("LoRA inits on the demo task (SmolLM2-135M, rank 16, same budget)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def quick_eval_file(root: Path) -> str:
    source = yaml.safe_load((ROOT / PRESET).read_text())["data"]["eval_path"]
    path = root / "quick-eval.jsonl"
    path.write_text("".join((ROOT / source).read_text().splitlines(keepends=True)[:QUICK_EVAL]))
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma list of {', '.join(RUNS)}")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the preset's 60)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_STEPS} steps, {QUICK_EVAL} eval records")
    parser.add_argument("--output-root", type=Path, default=Path("/tmp/splice-inits"))
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(RUNS)
    unknown = sorted(set(chosen) - set(RUNS))
    if unknown:
        parser.error(f"unknown init(s) {unknown}; choose from {', '.join(RUNS)}")
    args.output_root.mkdir(parents=True, exist_ok=True)
    eval_path = quick_eval_file(args.output_root) if args.quick else None
    suffix = "_quick" if args.quick else (f"_steps{args.steps}" if args.steps else "")
    rows = []
    for label in chosen:
        folder = args.output_root / (label + suffix)
        rows.append(row(label, folder, train(label, folder, command_for(label, folder, args, eval_path))))
    text, md = table(rows)
    print(text)
    results = results_dir()
    name = "inits" + suffix
    plot(rows, results / f"{name}.png")
    (results / f"{name}.json").write_text(json.dumps({
        "setup": {"preset": PRESET, "command": "bench/inits.py " + " ".join(sys.argv[1:]),
                  "cpu_threads": os.cpu_count()}, "rows": rows}, indent=1) + "\n")
    (results / f"{name}.md").write_text(
        f"# LoRA inits on the demo task\n\n`{'bench/inits.py ' + ' '.join(sys.argv[1:])}` · preset "
        f"`{PRESET}`, only --init (and --method qlora for loftq and its baseline) changes. "
        "See bench/inits.py for the columns.\n\n" + md + "\n")
    print(f"wrote {results / name}.json, .md, .png")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Every training method of `splice train` on the demo task: trainable parameters, held-out exact
match, eval loss, adapter size on disk and training time, side by side.

    .venv/bin/python bench/methods.py [--only lora,ia3] [--steps N] [--quick]
                                      [--output-root /tmp/splice-methods]

Setup: presets/demo.yaml (SmolLM2-135M fp32, data/demo: 1,000 training and 120 held-out
prompt/completion records, max 128 tokens, batch 8, 60 steps, 10% warm-up then cosine decay,
seed 0) for every method, plus the few per-method overrides in METHODS below, each with its
reason, and the larger step budgets in STEPS (prompt tuning: 180). Each method trains in its
own subprocess,

    .venv/bin/python -m splice train --config presets/demo.yaml --method M --output DIR \\
        --no-progress --resume [overrides]

with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads that spin slow a shared machine several
times). Its output folder, <output-root>/<method>-<hash of the full config>, keeps the run:
a folder whose training.json records the same config is reused, not retrained, and an
interrupted run continues from its last checkpoint (--resume), so a sweep stopped half-way
picks up where it was. Stop a sweep with Ctrl-C or `kill PID` (SIGTERM): the running method
then saves a checkpoint of where it got to. A resumed run's "train s" counts only the part
after the resume (the JSON marks the run "resumed").

Columns: trainable parameters and their share of the base model's 134.5M; greedy exact match on
the 120 held-out records and the eval loss (nats per completion token); "on disk" the files that
hold the trained weights (adapter_model.safetensors, or model/*.safetensors for full
fine-tuning; QLoRA's adapter also needs the NF4-quantized base, which is rebuilt from the base
model, not stored); "train s" the training loop's wall time (no model load, no evaluation);
"/lora" that time over LoRA's; "load" the 1-minute load average as the run started and ended;
steps as run. The runs follow one another over one to two hours on a shared machine: times (and
their ratios) are only as good as the load; rerun on a quiet machine before quoting them
(bench/train_step.py and bench/dora_step.py measure step costs with alternating runs).

--quick is a smoke run of the plumbing only (2 steps, the first 4 held-out records): its
accuracy and times mean nothing. Writes bench/results/methods.json and methods.md; --only and
--steps add _<names> and _steps<N> to the names, --quick writes only methods[...]_quick.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from splice.config.train import build_train_config, parse_overrides, set_dotted
from splice.tables import format_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PRESET = "presets/demo.yaml"
PYTHON = ROOT / ".venv" / "bin" / "python"
QUICK_STEPS, QUICK_EVAL = 2, 4

# method -> (overrides on top of the preset, why). The preset is tuned for LoRA; a method gets an
# override only where its own nature calls for it. Its `targets: all-linear` is LoRA's choice:
# the other adapter methods drop it (targets=null) and adapt the modules their papers do.
OWN_TARGETS = {"adapter.targets": None}
# What prompt and prefix tuning start from (see Note: virtual-token starts). No ": " in it: the
# CLI reads an override's value as YAML.
INIT_TEXT = "Rewrite the record as one line of key=value pairs for name, age, job and city."
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "lora": ({}, "the preset: rank 16 on all linears, lr 2e-3"),
    "qlora": ({}, "LoRA's settings on an NF4 base, so any difference is the 4-bit base's"),
    "dora": ({}, "LoRA's rank and lr, so the difference is DoRA's split of each weight into "
                 "a trained magnitude and a LoRA-updated direction"),
    # Adam moves each entry by about lr per step: scaling vectors that start at 1 need ~1e-2 to
    # move by tenths within 60 steps; the preset's 2e-3 leaves them near 1.
    "ia3": ({**OWN_TARGETS, "train.lr": 3e-2},
            "IA3's own targets (k, v, down_proj); its few scaling vectors start at 1, and lr 3e-2 "
            "lets them move by tenths in 60 steps"),
    # Note: virtual-token starts. Measured step-0 eval loss on 32 held-out records (base model
    # 1.047): prefix 'random' 7.99 (N(0, 1) keys and values wreck the layers whose own values are
    # small), 'zero' 1.24; prompt 'random' 1.04, 'sample_vocab' 0.99; 'text' 0.916 for both
    # (exactly the base model reading the text). So both start from the same text, which keeps
    # prompt vs prefix a comparison of what trains, not of where it starts. 20 tokens and lr 3e-2
    # as these methods usually run: the model is frozen, and 11.5k (prompt) or 230k (prefix)
    # numbers carry the whole change.
    "prompt": ({**OWN_TARGETS, "adapter.num_virtual_tokens": 20, "adapter.init": "text",
                "adapter.init_text": INIT_TEXT, "train.lr": 3e-2},
               "20 virtual tokens started from the embeddings of a task description (random "
               "N(0,1) is ~7x the embedding spread); lr 3e-2 as usual for prompt tuning; 180 "
               "steps, as at the common 60 it plateaued at 80.8% exact match (80.0% and 75.0% "
               "at lr 1e-1 and 3e-1)"),
    "prefix": ({**OWN_TARGETS, "adapter.num_virtual_tokens": 20, "adapter.init": "text",
                "adapter.init_text": INIT_TEXT, "train.lr": 3e-2},
               "20 key/value positions per layer started from the model's own keys and values "
               "for the task description (random N(0,1) starts at eval loss 8.0 vs the base "
               "model's 1.05); lr 3e-2 as usual for prefix tuning"),
    "adapter": ({**OWN_TARGETS, "adapter.bottleneck_size": 64},
                "Houlsby placement (after attention and MLP), 576->64->576: about LoRA's "
                "parameter count, at LoRA's lr"),
    # Every weight trains, and each starts from its pretrained value rather than from zero as a
    # LoRA update does: full fine-tuning of a small model usually runs at ~1e-4.
    "full": ({"train.lr": 1e-4}, "every weight trains: lr 1e-4, the usual scale for full "
                                 "fine-tuning of a small model (LoRA's 2e-3 is 20x that)"),
}
# Methods that get more than the common 60 steps; the steps column shows it. Prompt tuning's
# 11.5k numbers plateau early: at 60 steps it reached 80.8% exact match (eval loss 0.057) at lr
# 3e-2, 80.0% at 1e-1 and 75.0% at 3e-1; at 180 steps (3e-2) 96.7% (0.025).
STEPS: dict[str, int] = {"prompt": 180}


def method_overrides(method: str, args: argparse.Namespace,
                     eval_path: str | None) -> dict[str, Any]:
    overrides = dict(METHODS[method][0])
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS.get(method))
    if steps:
        overrides["train.steps"] = steps
    if eval_path:
        overrides["data.eval_path"] = eval_path
    return overrides


def as_cli(overrides: dict[str, Any]) -> list[str]:
    return [f"{key}={'null' if value is None else value}" for key, value in overrides.items()]


def expected_config(method: str, overrides: dict[str, Any], output: str) -> dict[str, Any]:
    """The config `splice train` will record for these arguments (built the way the CLI does)."""
    values = yaml.safe_load((ROOT / PRESET).read_text()) or {}
    set_dotted(values, "adapter.method", method)
    set_dotted(values, "output", output)
    for key, value in parse_overrides(as_cli(overrides)).items():
        set_dotted(values, key, value)
    return json.loads(json.dumps(build_train_config(values).to_dict()))


def run_folder(root: Path, method: str, overrides: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """<root>/<method>-<hash>: a folder per distinct config, so no sweep clobbers another's run."""
    config = expected_config(method, overrides, output="")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    folder = root / f"{method}-{digest}"
    config["output"] = str(folder)
    return folder, config


def finished(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    path = folder / "training.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("config") == config else None


def train(method: str, folder: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """One `splice train` subprocess; its output goes to <folder>/bench.log and, prefixed, here."""
    python = str(PYTHON.relative_to(ROOT)) if PYTHON.exists() else sys.executable  # runs in ROOT
    command = [python, "-m", "splice", "train",
               "--config", PRESET, "--method", method, "--output", str(folder), "--no-progress",
               "--resume", *as_cli(overrides)]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    folder.mkdir(parents=True, exist_ok=True)
    resumed = (folder / "checkpoints").is_dir() and any((folder / "checkpoints").iterdir())
    print(f"[{method}] {shlex.join(command)}", flush=True)
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    lines: list[str] = []
    with open(folder / "bench.log", "a") as log:  # a resumed run adds to its first part
        # Its own session: a Ctrl-C at the terminal reaches only this script, which passes on
        # exactly one SIGINT (a second would cut the run's checkpoint save short).
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            relay(proc, log, lines, method)
        except KeyboardInterrupt:  # the run saves a checkpoint; the next sweep resumes from it
            proc.send_signal(signal.SIGINT)
            relay(proc, log, lines, method)
            proc.wait()
            raise
        returncode = proc.wait()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run = {"command": shlex.join(command), "returncode": returncode, "resumed": resumed,
           "wall_s": round(time.perf_counter() - start, 1),
           "cpu_s": round(cpu_after.ru_utime + cpu_after.ru_stime
                          - cpu_before.ru_utime - cpu_before.ru_stime, 1),
           "load_avg_1min": [load_before, os.getloadavg()[0]]}
    if returncode != 0:
        run["error_tail"] = lines[-25:]
    else:
        (folder / "bench.json").write_text(json.dumps(run, indent=1) + "\n")
    return run


def relay(proc: subprocess.Popen, log: Any, lines: list[str], method: str) -> None:
    """Copy the run's output to its log, to `lines` and, prefixed with the method, to stdout."""
    for line in proc.stdout:
        log.write(line)
        lines.append(line.rstrip("\n"))
        print(f"[{method}] {line}", end="", flush=True)


def stop_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def weight_bytes(folder: Path, method: str) -> int:
    """Bytes of the files that hold the trained weights (tokenizer and configs left out)."""
    if method == "full":
        files = list((folder / "model").glob("*.safetensors"))
    else:
        files = [folder / "adapter_model.safetensors"]
    return sum(f.stat().st_size for f in files if f.is_file())


def row(method: str, folder: Path, record: dict[str, Any], run: dict[str, Any],
        overrides: dict[str, Any]) -> dict[str, Any]:
    m = record["metrics"]
    base = m["total_params"] if method == "full" else m["total_params"] - m["trainable_params"]
    return {"method": method, "status": "ok", "output": str(folder),
            "trainable_params": m["trainable_params"], "base_params": base,
            "trainable_percent": 100 * m["trainable_params"] / base,
            "exact_match": m["exact_match"], "eval_loss": m["eval_loss"],
            "final_train_loss": m["final_train_loss"], "weight_bytes": weight_bytes(folder, method),
            "train_seconds": m["train_seconds"], "steps": m["steps"], "overrides": overrides,
            "why": METHODS[method][1], **{k: v for k, v in run.items() if k != "returncode"}}


def fmt_row(r: dict[str, Any], lora_s: float | None) -> list[str]:
    shown = {k: "TEXT" if v == INIT_TEXT else v for k, v in r["overrides"].items()
             if k not in ("train.steps", "data.eval_path")}
    overrides = " ".join(as_cli(shown)) or "(preset)"
    if r["status"] != "ok":
        return [r["method"], "failed", "", "", "", "", "", "", "", "", overrides]
    size = r["weight_bytes"] / 2**20
    load = "–".join(f"{x:.1f}" for x in r["load_avg_1min"]) if "load_avg_1min" in r else "-"
    seconds = f"{r['train_seconds']:.0f}" + (" (resumed)" if r.get("resumed") else "")
    return [r["method"], f"{r['trainable_params']:,}", f"{r['trainable_percent']:.3g}%",
            "-" if r["exact_match"] is None else f"{100 * r['exact_match']:.1f}%",
            "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}",
            f"{size:.3g} MiB", seconds,
            f"{r['train_seconds'] / lora_s:.2f}" if lora_s else "-", load, str(r["steps"]),
            overrides]


HEADERS = ["method", "trainable", "% of base", "exact match", "eval loss", "on disk", "train s",
           "/lora", "load", "steps", "overrides"]


def tables(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(terminal table, markdown table)."""
    lora = next((r for r in rows if r["method"] == "lora" and r["status"] == "ok"), None)
    cells = [fmt_row(r, lora["train_seconds"] if lora else None) for r in rows]
    right = [False] + [True] * 9 + [False]
    text = format_table(HEADERS, cells, right)
    md = ["| " + " | ".join(HEADERS) + " |",
          "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return text, "\n".join(md)


def markdown(result: dict[str, Any], table: str) -> str:
    s = result["setup"]
    runs = [r for r in result["rows"] if "wall_s" in r]
    loads = [x for r in runs for x in r["load_avg_1min"]]
    timing = (f" · the runs took {sum(r['wall_s'] for r in runs) / 60:.0f} min in all (load and "
              f"evaluation included) at a 1-min load average of {min(loads):.1f}–{max(loads):.1f}"
              if runs else "")
    lines = [f"# PEFT methods on the demo task ({s['model']})", "",
             f"`{s['command']}` · preset `{PRESET}` (batch {s['batch_size']}, max {s['max_len']} "
             f"tokens, warm-up {s['warmup_ratio']}, seed {s['seed']}) · exact match on "
             f"{s['eval_records']} held-out records on {os.cpu_count()} CPU threads{timing}", "",
             table, "",
             f"TEXT = `{INIT_TEXT}`", "", "Why each method's overrides:", ""]
    lines += [f"- **{r['method']}**: {r['why']}" for r in result["rows"] if "why" in r]
    failed = [r for r in result["rows"] if r["status"] != "ok"]
    for r in failed:
        lines += ["", f"**{r['method']} failed** (exit {r.get('returncode')}): "
                  f"`{r.get('command')}`", "", "```", *r.get("error_tail", []), "```"]
    lines += ["", f"One seed per method; one record is {100 / s['eval_records']:.2g} points of "
              "exact match. The runs went one after another on a shared machine (see the load "
              "average): their times are rough; exact match, losses and sizes do not depend on "
              "the load. See bench/methods.py."]
    return "\n".join(lines) + "\n"


def run_method(method: str, args: argparse.Namespace, eval_path: str | None) -> dict[str, Any]:
    """The method's table row: from its finished run with the same config, else from a new run."""
    overrides = method_overrides(method, args, eval_path)
    folder, config = run_folder(args.output_root, method, overrides)
    record = finished(folder, config)
    if record is not None:
        print(f"[{method}] reusing {folder}", flush=True)
        sidecar = folder / "bench.json"
        run = {**(json.loads(sidecar.read_text()) if sidecar.is_file() else {}), "reused": True}
    else:
        run = train(method, folder, overrides)
        record = finished(folder, config) if run["returncode"] == 0 else None
        if record is None and run["returncode"] == 0:
            run["error_tail"] = [f"exit 0, but {folder}/training.json does not hold the config "
                                 "this sweep asked for"]
    if record is None:
        return {"method": method, "status": "failed", "output": str(folder),
                "overrides": overrides, "why": METHODS[method][1], **run}
    return row(method, folder, record, run, overrides)


def quick_eval_file(root: Path) -> str:
    """The first QUICK_EVAL held-out records, so a smoke run's greedy generation takes seconds."""
    source = yaml.safe_load((ROOT / PRESET).read_text())["data"]["eval_path"]
    path = root / "quick-eval.jsonl"
    path.write_text("".join((ROOT / source).read_text().splitlines(keepends=True)[:QUICK_EVAL]))
    return str(path)


def results_name(args: argparse.Namespace, chosen: list[str]) -> str:
    name = "methods" if chosen == list(METHODS) else "methods_" + "-".join(chosen)
    return name + (f"_steps{args.steps}" if args.steps else "") + ("_quick" if args.quick else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help=f"comma list of {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, help="optimizer steps for every method "
                        "(default: the preset's 60, or the method's documented budget)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_STEPS} steps, {QUICK_EVAL} eval records")
    parser.add_argument("--output-root", type=Path, default=Path("/tmp/splice-methods"))
    args = parser.parse_args()
    chosen = args.only.split(",") if args.only else list(METHODS)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: choose from {', '.join(METHODS)}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps {args.steps}: give a positive number of steps")
    chosen = [m for m in METHODS if m in chosen]
    args.output_root.mkdir(parents=True, exist_ok=True)
    eval_path = quick_eval_file(args.output_root) if args.quick else None
    # A sweep started in the background (nohup ... &) inherits an ignored SIGINT, which its runs
    # would inherit too and so never save a checkpoint: restore it, and treat `kill` like Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    try:
        rows = [run_method(method, args, eval_path) for method in chosen]
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue", file=sys.stderr)
        return 130
    preset = yaml.safe_load((ROOT / PRESET).read_text())
    eval_file = ROOT / preset["data"]["eval_path"] if eval_path is None else Path(eval_path)
    result = {"setup": {"model": preset["model"], "preset": PRESET, **preset["train"],
                        "max_len": preset["data"]["max_len"],
                        "eval_records": len(eval_file.read_text().splitlines()),
                        "command": shlex.join(["bench/methods.py", *sys.argv[1:]]),
                        "output_root": str(args.output_root),
                        "wall_s": round(time.perf_counter() - started, 1),
                        "load_avg_1min": [load_start, os.getloadavg()[0]]},
              "rows": rows}
    text, md = tables(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = results_name(args, chosen)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    written = [f"{name}.json"]
    if not args.quick:  # a smoke run's numbers mean nothing: no markdown table to mistake
        (RESULTS / f"{name}.md").write_text(markdown(result, md))
        written.append(f"{name}.md")
    print("\n" + text)
    print(f"\nwrote {', '.join(str(RESULTS / n) for n in written)} "
          f"({result['setup']['wall_s'] / 60:.1f} min)")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

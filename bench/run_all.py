"""`make bench`: run every benchmark side by side with its peers, then write bench/RESULTS.md
(machine, date, one table per figure with medians, ratios and its target, met or not) and a PNG
chart per figure under bench/results/.

    .venv/bin/python bench/run_all.py                 # the full run (under 30 min on 2 quiet cores)
    .venv/bin/python bench/run_all.py --quick --jobs 2  # smoke run: every benchmark, tiny sizes
    .venv/bin/python bench/run_all.py --report-only   # rewrite RESULTS.md from the JSONs there
    .venv/bin/python bench/run_all.py --only mixed_batch,adapter_io --output /tmp/bench

Each benchmark runs as its own subprocess, one after another, and alternates its contenders
itself (bench/common.py, Note: alternation); its JSON lands in <output>/results (the runner sets
$SPLICE_BENCH_RESULTS). --quick passes each benchmark its --quick flag (small sizes, one
repetition) and proves only that the benchmarks still run: its numbers mean nothing and
nothing about speed is asserted; it writes RESULTS_quick.md and *_quick.json / *_quick.png.
bench/methods.py (every training method on the demo task, ~1.5 h) is not part of this run:
`make bench-methods`. A benchmark that fails or writes no fresh JSON gets its log tail in
RESULTS.md and makes the exit status 1; the others still run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from charts import draw  # noqa: E402
from common import BENCH, RESULTS_ENV, child_env  # noqa: E402
from figures import FIGURES, Figure, Section  # noqa: E402


@dataclass(frozen=True)
class Run:
    """One benchmark invocation and the JSON it writes (results/<result>[_quick].json)."""

    result: str
    script: str
    args: tuple[str, ...] = ()


# The longest quick runs first, so that `--quick --jobs 2` keeps both workers busy to the end.
RUNS = (
    Run("serve_load", "serve_load.py"),
    Run("dora_step", "dora_step.py"),
    Run("mixed_batch", "mixed_batch.py"),
    Run("optimizer_curves", "optimizer_curves.py"),
    Run("adapter_io", "adapter_io.py"),
    Run("train_step", "train_step.py"),
    Run("inference_latency", "inference_latency.py"),
    Run("train_step_splice_qlora", "train_step.py", ("--only", "splice,qlora")),
    Run("library_load", "library_load.py"),
    Run("nf4_throughput", "nf4_throughput.py"),
    Run("loss_memory", "loss_memory.py"),
)
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "safetensors")


def machine() -> dict[str, str]:
    """What the numbers were measured on: CPU model, cores, memory, library versions."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem_kb = next((int(line.split()[1]) for line in meminfo.splitlines()
                   if line.startswith("MemTotal")), 0)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "CPU": model,
        "cores": f"{usable} usable of {os.cpu_count()} (AVX-512: "
                 f"{'yes' if 'avx512f' in flags else 'no'})",
        "memory": f"{mem_kb / 2**20:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        **versions,
    }


def run_benchmark(run: Run, args: argparse.Namespace, results: Path, logs: Path) -> dict:
    """Run one benchmark; {seconds, ok, log, reason}. A result counts only if written after
    the start (a failed run must not report an older JSON)."""
    script = BENCH / run.script
    if args.quick and "--quick" not in script.read_text():
        return {"ok": True, "skipped": True, "seconds": 0.0,
                "reason": f"bench/{run.script} has no --quick flag yet"}
    cmd = [sys.executable, str(script), *run.args] + (["--quick"] if args.quick else [])
    env = {**child_env(), RESULTS_ENV: str(results)}
    log = logs / f"{run.result}.log"
    start = time.time()
    print(f"== {run.result}: {' '.join(cmd[1:])}", flush=True)
    with open(log, "w") as out:
        try:
            code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=BENCH.parent, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {args.timeout} s"
    seconds = time.time() - start
    name = f"{run.result}{'_quick' if args.quick else ''}.json"
    path, default = results / name, BENCH / "results" / name
    fresh = path.exists() and path.stat().st_mtime >= start - 1
    if not fresh and default.exists() and default.stat().st_mtime >= start - 1:
        # a benchmark that does not read $SPLICE_BENCH_RESULTS wrote to bench/results
        path.write_bytes(default.read_bytes())
        fresh = True
    reason = None if code == 0 and fresh else (
        f"exit status {code}" if code != 0 else f"wrote no fresh {path.name}")
    print(f"   {seconds:.0f} s, {'ok' if reason is None else reason}", flush=True)
    return {"ok": reason is None, "seconds": seconds, "log": str(log), "reason": reason}


def load_result(figure: Figure, results: Path, quick: bool) -> dict | None:
    path = results / f"{figure.result}{'_quick' if quick else ''}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def verdict(met: bool | None) -> str:
    return "—" if met is None else ("met" if met else "**not met**")


def value_text(value: float | bool | None) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    return f"{value:.2e}" if 0 < abs(value) < 0.01 else f"{value:.3g}"


def figure_section(figure: Figure, data: dict | None, status: dict | None, results: Path,
                   quick: bool) -> tuple[list[str], Section | None]:
    lines = [f"## {figure.title}", "", f"Compares: {figure.compares}.  ",
             f"Target: {figure.target}.", ""]
    if status is not None and status.get("skipped"):
        return lines + [f"Skipped in this run: {status['reason']}.", ""], None
    if status is not None and not status["ok"]:
        lines += [f"**Did not run: {status['reason']}.**", ""]
        tail = Path(status["log"]).read_text()[-1500:] if status.get("log") else ""
        if tail:
            lines += ["```", *tail.strip().splitlines()[-15:], "```", ""]
        return lines, None
    if data is None:
        return lines + ["No result file.", ""], None
    try:
        section = figure.build(data)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, StopIteration) as error:
        return lines + [f"**Could not read its JSON: {type(error).__name__}: {error}.**", ""], None
    lines += table(section.headers, section.rows) + [""]
    lines += table(["check", "measured", "target", "verdict"],
                   [[c.what, value_text(c.value), c.target, verdict(c.met)]
                    for c in section.checks]) + [""]
    suffix = "_quick" if quick else ""
    chart = f"{figure.chart or figure.key}{suffix}.png"
    if section.panels and figure.chart is None:
        draw(section.panels, f"{figure.title}\n{figure.target}", results / chart)
    if (results / chart).exists():
        lines += [f"![{figure.title}](results/{chart})", ""]
    lines += [f"- {note}" for note in section.notes]
    data = results / f"{figure.result}{suffix}.json"
    stamp = json.loads(data.read_text()).get("measured_at") if data.is_file() else None
    measured = f", measured {stamp}" if stamp else ", measurement time not recorded in the file"
    lines += [f"- data: results/{figure.result}{suffix}.json{measured}"
              + (f", ran in {status['seconds']:.0f} s" if status else ""), ""]
    return lines, section


def write_report(output: Path, statuses: dict[str, dict], quick: bool, figures: list[Figure],
                 started: str, wall_s: float | None) -> Path:
    results = output / "results"
    body, summary, index = [], [], []
    for figure in figures:
        status = statuses.get(figure.result)
        lines, section = figure_section(figure, load_result(figure, results, quick), status,
                                        results, quick)
        body += lines
        checks = section.checks if section else []
        numeric = [c.met for c in checks if c.met is not None]
        overall = ("did not run" if section is None else "—" if not numeric
                   else "met" if all(numeric) else "**not met**")
        index.append({"key": figure.key, "title": figure.title, "result": figure.result,
                      "status": "not run now" if status is None else "skipped"
                      if status.get("skipped") else "ok" if status["ok"] else "failed",
                      "reason": status and status.get("reason"),
                      "seconds": status and status["seconds"], "verdict": overall.strip("*"),
                      "checks": [vars(c) for c in checks]})
        summary.append([figure.title, figure.target,
                        "; ".join(f"{c.what}: {value_text(c.value)}" for c in checks) or "—",
                        overall])
    info = machine()
    head = ["# splice benchmarks", "",
            f"Written by `bench/run_all.py{' --quick' if quick else ''}` (`make "
            f"bench{'-quick' if quick else ''}`), started {started}"
            + (f", {wall_s / 60:.1f} min in all" if wall_s else
               ", from the result files already in results/ (`--report-only`: nothing was rerun; "
               "each figure says when its data was measured)") + ".",
            "Each benchmark alternates its contenders within one run (warm-up first, then "
            "several rounds) and reports medians; ratios are medians of per-round ratios, so "
            "machine noise hits every contender alike. Rerun on a quiet machine before quoting "
            "absolute times.", ""]
    if quick:
        head += ["**Quick mode: a smoke run at tiny sizes and one repetition. It proves the "
                 "benchmarks run; its numbers and verdicts mean nothing.**", ""]
    load = os.getloadavg()
    head += ["## Machine", ""] + table(["", ""], [[k, v] for k, v in info.items()]
                                       + [["load average (1, 5, 15 min) at the end",
                                           ", ".join(f"{x:.1f}" for x in load)]]) + [""]
    head += ["## Summary", ""] + table(["figure", "target", "measured", "verdict"], summary) + [""]
    path = output / f"RESULTS{'_quick' if quick else ''}.md"
    path.write_text("\n".join(head + body))
    # the same verdicts for machines: what ran, how long, met or not
    (results / f"index{'_quick' if quick else ''}.json").write_text(json.dumps(
        {"started": started, "wall_s": wall_s, "quick": quick, "machine": info,
         "figures": index}, indent=1) + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: each benchmark's --quick (tiny sizes, one repetition)")
    parser.add_argument("--output", type=Path, default=BENCH,
                        help="folder for RESULTS.md; JSONs and PNGs go to its results/ "
                             "(default: bench/)")
    parser.add_argument("--only", help="comma list of result names to run, from "
                                       + ", ".join(r.result for r in RUNS))
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; rewrite RESULTS.md from the JSONs in <output>/results")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark")
    parser.add_argument("--jobs", type=int, default=1,
                        help="benchmarks run at once; more than 1 only for --quick (concurrent "
                             "benchmarks skew each other's timings)")
    parser.add_argument("--logs", type=Path, help="folder for each benchmark's output "
                                                  "(default: a new temporary folder)")
    args = parser.parse_args()
    # A benchmark written elsewhere (serve_load.py) joins once its script exists.
    runs = [r for r in RUNS if (BENCH / r.script).exists()]
    chosen = set(args.only.split(",")) if args.only else {r.result for r in runs}
    if args.jobs > 1 and not args.quick:
        parser.error("--jobs > 1 needs --quick: benchmarks timed side by side skew each other")
    unknown = chosen - {r.result for r in RUNS}
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from "
                     + ", ".join(r.result for r in RUNS))
    results = args.output / "results"
    results.mkdir(parents=True, exist_ok=True)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="splice-bench-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    start = time.time()
    statuses = {}
    if not args.report_only:
        print(f"logs in {logs}", flush=True)
        todo = [run for run in runs if run.result in chosen]
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            done = pool.map(lambda run: run_benchmark(run, args, results, logs), todo)
            statuses = {run.result: status for run, status in zip(todo, done)}
    # every figure whose benchmark exists; those not run now show the JSON already there
    present = {r.result for r in runs}
    figures = [f for f in FIGURES if f.result in present]
    path = write_report(args.output, statuses, args.quick, figures, started,
                        None if args.report_only else time.time() - start)
    print(f"wrote {path} ({time.time() - start:.0f} s)")
    return 0 if all(s["ok"] for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

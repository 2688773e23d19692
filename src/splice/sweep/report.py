"""What a sweep reports, read from the study's storage: results.csv (every trial),
results.md (sorted: complete by eval loss, then pruned, then failed), eval loss against rank per
learning rate (rank.png), Optuna's parameter importances (importance.png), and a summary with
the `splice train` command line that reproduces the winner.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from splice.sweep.objective import METRIC_ATTRS  # noqa: E402
from splice.tables import format_table  # noqa: E402

# Row order; 'interrupted' is a trial whose sweep process was killed (it is rerun on resume).
STATES = ("complete", "pruned", "failed", "interrupted")
# The measured columns, in order: what trials record, plus a pruned trial's last eval loss.
MEASURED = tuple(c for name in METRIC_ATTRS
                 for c in ((name, "pruned_eval_loss") if name == "pruned_at_step" else (name,)))
# Values the sweep sets for its own bookkeeping; they do not change what a run learns.
SWEEP_ONLY = {("output",), ("train", "eval_every"), ("train", "save_every")}


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One dict per finished trial, best first; `params` holds the knobs the space named."""
    trials = [t for t in study.get_trials(deepcopy=False) if state_name(t) is not None]
    trials.sort(key=sort_key)
    return [row(t) for t in trials]


def state_name(trial: FrozenTrial) -> str | None:
    if trial.state == TrialState.FAIL:
        return "failed" if "error" in trial.user_attrs else "interrupted"
    return {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(trial.state)


def sort_key(trial: FrozenTrial) -> tuple:
    steps = trial.intermediate_values
    value = trial.value if trial.state == TrialState.COMPLETE else (
        steps[max(steps)] if steps else math.inf)
    return STATES.index(state_name(trial)), value, trial.number


def row(trial: FrozenTrial) -> dict[str, Any]:
    attrs = trial.user_attrs
    out: dict[str, Any] = {"trial": trial.number, "state": state_name(trial),
                           "eval_loss": trial.value if trial.state == TrialState.COMPLETE else None}
    out.update(trial.params)
    out.update({name: attrs.get(name) for name in METRIC_ATTRS})
    steps = trial.intermediate_values
    out["pruned_eval_loss"] = steps[max(steps)] if trial.state == TrialState.PRUNED and steps else None
    out["seconds"] = attrs.get("seconds")
    return out


def columns(rows: list[dict[str, Any]], params: list[str]) -> list[str]:
    present = [c for c in MEASURED if any(r.get(c) is not None for r in rows)]
    return ["trial", "state", "eval_loss", *params, *present, "seconds"]


def param_names(study: optuna.Study) -> list[str]:
    names: list[str] = []
    for trial in study.get_trials(deepcopy=False):
        names += [n for n in trial.params if n not in names]
    return names


def write_csv(rows: list[dict[str, Any]], cols: list[str], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def cell(name: str, value: Any) -> str:
    if value is None:
        return ""
    if name == "exact_match":
        return f"{100 * value:.1f}%"
    if name == "adapter_bytes":
        return f"{value / 2**20:.2f} MiB"
    if name == "error":
        text = str(value).replace("|", "/").replace("\n", " ")
        return text if len(text) <= 80 else text[:77] + "..."
    if name in ("eval_loss", "pruned_eval_loss"):
        return f"{value:.4f}"
    if name == "lr":
        return f"{value:.3g}"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(study: optuna.Study, rows: list[dict[str, Any]], cols: list[str],
                   path: Path) -> Path:
    counts = ", ".join(f"{n} {s}" for s in STATES if (n := sum(r["state"] == s for r in rows)))
    head = (f"# Sweep `{study.study_name}`\n\n{len(rows)} trials: {counts}. Sorted by eval loss (nats per "
            "supervised token, lower is better); pruned trials by their last intermediate eval "
            "loss. step_s is the median optimizer step; peak_rss_mb the trial process's peak "
            "resident memory.\n\n")
    path.write_text(head + markdown_table(rows, cols) + "\n")
    return path


def lr_label(lr: float) -> str:
    return f"lr {lr:.1g}"


def plot_rank(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Eval loss against rank, one line per learning rate (to one significant digit)."""
    points = [(r["rank"], r.get("lr"), r["eval_loss"]) for r in rows
              if r["eval_loss"] is not None and r.get("rank") is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    groups: dict[float, list[tuple[int, float]]] = {}
    for rank, lr, loss in points:
        groups.setdefault(float(f"{lr:.1g}") if lr is not None else math.nan, []).append((rank, loss))
    for lr, group in sorted(groups.items()):
        group.sort()
        ax.plot(*zip(*group), "o-", label=lr_label(lr) if lr == lr else "lr fixed", linewidth=1.2)
    ax.set_xscale("log", base=2)
    ranks = sorted({rank for rank, _, _ in points})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title("eval loss against rank, per learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_importance(study: optuna.Study, path: Path) -> Path | None:
    """Optuna's parameter importances as bars; None when they cannot be computed yet (fewer
    than two complete trials, or no knob that varied)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError):
            return None
    # Optuna warns, and returns equal shares, when there are too few trials to tell.
    if not importances or any(issubclass(w.category, UserWarning) for w in caught):
        return None
    names, values = list(importances)[::-1], list(importances.values())[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.5), dpi=120)
    ax.barh(names, values)
    ax.set_xlabel("importance (share of the eval-loss variation)")
    ax.set_title("parameter importance")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def train_command(values: Mapping[str, Any], output: str = "runs/sweep-best") -> str:
    """The `splice train` command line that trains with `values` (everything but the sweep's own
    bookkeeping), as flags for model and data and dotted overrides for the rest."""
    parts = ["splice train", f"--model {values.get('model', 'smollm2-135m')}"]
    data = values.get("data", {})
    parts.append(f"--data {data['path']}")
    if data.get("eval_path"):
        parts.append(f"--eval-data {data['eval_path']}")
    parts.append(f"--output {output}")
    for section in ("data", "adapter", "train"):
        for key, value in values.get(section, {}).items():
            if (section, key) in SWEEP_ONLY or (section == "data" and key in ("path", "eval_path")):
                continue
            if value is not None:
                parts.append(f"{section}.{key}={override_text(value)}")
    return " ".join(parts)


def override_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)  # repr: the exact float


@dataclass(frozen=True)
class SweepReport:
    rows: list[dict[str, Any]]
    params: list[str]
    csv: Path
    markdown: Path
    plots: list[Path]
    best: FrozenTrial | None
    best_folder: Path | None


def write_report(study: optuna.Study, folder: Path) -> SweepReport:
    rows = trial_rows(study)
    cols = columns(rows, param_names(study))  # the knobs of every space this study has seen
    plots = [plot_rank(rows, folder / "rank.png"), plot_importance(study, folder / "importance.png")]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    best = study.best_trial if complete else None
    best_folder = folder / "best" if (folder / "best").is_dir() else None
    return SweepReport(rows, param_names(study), write_csv(rows, cols, folder / "results.csv"),
                       write_markdown(study, rows, cols, folder / "results.md"),
                       [p for p in plots if p is not None], best, best_folder)


def summary(report: SweepReport, top: int = 10) -> str:
    rows = report.rows
    cols = ["trial", "state", "eval_loss", *report.params, "exact_match", "step_s", "pruned_at_step"]
    table = format_table(cols, [[cell(c, r.get(c)) for c in cols] for r in rows[:top]])
    lines = [table, "", f"{len(rows)} trials; results: {report.csv}, {report.markdown}"
             + "".join(f", {p}" for p in report.plots)]
    if report.best is None:
        return "\n".join(lines + ["no trial completed: see the error column of results.md"])
    best = report.best
    em = best.user_attrs.get("exact_match")
    lines.append(f"best: trial {best.number}, eval loss {best.value:.4f}"
                 + (f", exact match {100 * em:.1f}%" if em is not None else "")
                 + f" ({', '.join(f'{k}={cell(k, v)}' for k, v in best.params.items())})")
    if report.best_folder is not None:
        lines.append(f"best adapter: {report.best_folder}")
    if "config" in best.user_attrs:
        lines.append("reproduce:\n  " + train_command(best.user_attrs["config"]))
    return "\n".join(lines)

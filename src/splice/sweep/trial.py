"""One sweep trial, child side: `python -m splice.sweep.trial trials/NNNN/trial.json`.

Trains with `run_training`, reports each intermediate eval loss to the trial in the study's
storage and stops when the pruner says so, then writes result.json next to trial.json: the
status ("complete", "pruned" or "failed" with its error) and what it measured. Whatever goes
wrong is caught and written down; only a process killed from outside leaves no result (the
parent records that).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import optuna

from splice.analysis import analyze_folder
from splice.config.train import TrainConfig, build_train_config
from splice.sweep.objective import PARENT_ENV, TrialSpec
from splice.sweep.study import make_pruner, open_storage
from splice.train.run import TrainResult, run_training

ADAPTER_FILE = "adapter_model.safetensors"


class StepWatcher:
    """`run_training`'s on_step hook: times the steps, reports eval losses, asks to prune."""

    def __init__(self, trial: optuna.Trial | None) -> None:
        self.trial = trial
        self.last: float | None = None  # the first step (warm-up, lazy allocations) is not timed
        self.step_times: list[float] = []
        self.eval_step: int | None = None

    def __call__(self, record: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self.last is not None and "eval_loss" not in record:  # an evaluation is not a step
            self.step_times.append(now - self.last)
        if "eval_loss" in record and self.trial is not None:
            self.eval_step = record["step"]
            self.trial.report(record["eval_loss"], record["step"])
            if self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {record['step']}: eval loss "
                                         f"{record['eval_loss']:.4f}")
        self.last = time.perf_counter()  # reporting to the storage is not training time

    def step_s(self) -> float | None:
        return round(statistics.median(self.step_times), 4) if self.step_times else None


def open_trial(spec: TrialSpec) -> optuna.Trial:
    storage = open_storage(spec.storage, heartbeat=False)
    study = optuna.load_study(study_name=spec.study_name, storage=storage,
                              pruner=make_pruner(spec.pruner, spec.startup_trials))
    study_id = storage.get_study_id_from_name(spec.study_name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(
        study_id, spec.trial_number))


def run_trial(spec: TrialSpec) -> dict[str, Any]:
    """Train one trial; the result.json content."""
    watcher = StepWatcher(open_trial(spec))
    try:
        config = build_train_config(spec.values)
        result = run_training(config, show_progress=False, on_step=watcher)
    except optuna.TrialPruned:
        return {"status": "pruned", "metrics": {"pruned_at_step": watcher.eval_step,
                                                "step_s": watcher.step_s()}}
    except Exception as err:  # noqa: BLE001 - every failure is the trial's record, not a crash
        traceback.print_exc()
        return {"status": "failed", "metrics": {"error": f"{type(err).__name__}: {err}",
                                                "step_s": watcher.step_s()}}
    metrics = measured(result, watcher)
    if spec.intruders:
        metrics["intruders"] = count_intruders(config, result.output)
    return {"status": "complete", "eval_loss": result.eval_loss, "metrics": metrics}


def measured(result: TrainResult, watcher: StepWatcher) -> dict[str, Any]:
    adapter = result.output / ADAPTER_FILE
    return {"exact_match": result.exact_match, "trainable_params": result.trainable,
            "adapter_bytes": adapter.stat().st_size if adapter.is_file() else None,
            "step_s": watcher.step_s(), "steps": result.steps,
            "final_train_loss": result.final_loss}


def count_intruders(config: TrainConfig, folder: Path) -> int | None:
    """Intruder dimensions of the trained adapter (summed over its matrices at the analysis'
    default threshold); None for what the analysis cannot read (full fine-tuning)."""
    if not (folder / ADAPTER_FILE).is_file():
        return None
    try:
        return analyze_folder(config.model, folder).summary.intruder_dimensions
    except Exception:  # noqa: BLE001 - a diagnostic that fails must not fail a trained trial
        traceback.print_exc()
        return None


def die_with_parent() -> None:
    """End this process when the sweep process that started it dies: a killed sweep must not
    leave trials training on. Linux delivers SIGKILL from then on; a parent that died before
    (while this process was still importing) shows as a changed parent pid."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if str(os.getppid()) != os.environ.get(PARENT_ENV, str(os.getppid())):
        sys.exit("the sweep process that started this trial is gone")


def main(argv: list[str]) -> int:
    die_with_parent()
    spec_path = Path(argv[0])
    result = run_trial(TrialSpec(**json.loads(spec_path.read_text())))
    (spec_path.parent / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One sweep trial, parent side: the trial's knobs -> a TrainConfig -> `splice.sweep.trial` in a
child process -> the trial's record in the study.

The child process is what lets the sweep go on past a trial that dies: an exception (NaN loss,
a bad combination of knobs), the kernel's OOM killer or a segfault all end up as a failed trial
with its error, and the next trial starts in a fresh process. The parent reads the child's peak
resident memory from the kernel (`wait4`), so a child killed for memory still has one.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

import optuna

from splice.config.base import ConfigError
from splice.config.train import build_train_config, set_dotted
from splice.core.errors import SpliceError
from splice.sweep.space import KNOBS, Knob, SweepSpace

# What a trial leaves in the study's user attributes (the sweep's record; report.py reads them).
METRIC_ATTRS = ("exact_match", "trainable_params", "adapter_bytes", "step_s", "peak_rss_mb",
                "intruders", "pruned_at_step", "error")
CHILD_COMMAND = (sys.executable, "-m", "splice.sweep.trial")
PARENT_ENV = "SPLICE_SWEEP_PARENT"  # the sweep process's pid, for the trial process


class TrialFailed(SpliceError):
    """A trial ended without an eval loss; its error is in the trial's `error` attribute."""


@dataclass(frozen=True)
class TrialSpec:
    """What the child process needs, written to trials/NNNN/trial.json."""

    values: Mapping[str, Any]  # the nested TrainConfig values
    storage: str
    study_name: str
    trial_number: int
    pruner: str
    startup_trials: int
    intruders: bool


@dataclass
class Outcome:
    """What a child process reported (result.json), plus what the parent measured."""

    status: str  # "complete" | "pruned" | "failed"
    metrics: dict[str, Any] = field(default_factory=dict)
    eval_loss: float | None = None


def suggest(trial: optuna.Trial, space: SweepSpace) -> dict[str, Any]:
    """The trial's value for every knob of the space."""
    params: dict[str, Any] = {}
    for knob in space.knobs:
        if knob.choices is not None:
            params[knob.name] = trial.suggest_categorical(knob.name, list(knob.choices))
        elif knob.spec.kind is int:
            params[knob.name] = trial.suggest_int(knob.name, int(knob.low), int(knob.high),
                                                  log=knob.log)
        else:
            params[knob.name] = trial.suggest_float(knob.name, knob.low, knob.high, log=knob.log)
    return params


def distribution(knob: Knob) -> optuna.distributions.BaseDistribution:
    """The distribution `suggest` records for a knob."""
    if knob.choices is not None:
        return optuna.distributions.CategoricalDistribution(list(knob.choices))
    if knob.spec.kind is int:
        return optuna.distributions.IntDistribution(int(knob.low), int(knob.high), log=knob.log)
    return optuna.distributions.FloatDistribution(knob.low, knob.high, log=knob.log)


def train_values(base: Mapping[str, Any], params: Mapping[str, Any], output: Path,
                 eval_every: int) -> dict[str, Any]:
    """The base training values with the trial's knobs, output and eval cadence set."""
    values = copy.deepcopy(dict(base))
    for name, value in params.items():
        if KNOBS[name].key:
            set_dotted(values, KNOBS[name].key, value)
    if "alpha_ratio" in params:
        rank = build_train_config(values).adapter.rank
        set_dotted(values, "adapter.alpha", float(params["alpha_ratio"] * rank))
    set_dotted(values, "output", str(output))
    set_dotted(values, "train.eval_every", eval_every)
    set_dotted(values, "train.save_every", 0)  # a killed trial is rerun, not resumed
    build_train_config(values)  # fails here, in the parent, on a bad combination
    return values


def worker_id() -> str:
    """host:pid of this sweep process: how a resumed sweep finds the trials it left running."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Objective:
    """optuna's objective: run one trial in a child process and record what it measured."""

    def __init__(self, space: SweepSpace, base: Mapping[str, Any], folder: Path, storage: str,
                 study_name: str, threads: int) -> None:
        self.space, self.base, self.folder = space, base, folder
        self.storage, self.study_name, self.threads = storage, study_name, threads

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker_id())
        params = suggest(trial, self.space)
        folder = trial_folder(self.folder, trial.number)
        try:
            values = train_values(self.base, params, folder, self.space.eval_every)
        except ConfigError as err:
            return fail(trial, f"ConfigError: {err}")
        trial.set_user_attr("config", values)
        spec = TrialSpec(values, self.storage, self.study_name, trial.number,
                         self.space.pruner, self.space.startup_trials, self.space.intruders)
        outcome = run_child(spec, folder, self.threads)
        for name, value in outcome.metrics.items():
            trial.set_user_attr(name, value)
        if outcome.status == "pruned":
            raise optuna.TrialPruned(f"pruned at step {outcome.metrics.get('pruned_at_step')}")
        if outcome.status != "complete" or outcome.eval_loss is None:
            return fail(trial, outcome.metrics.get("error", "the trial reported no eval loss"))
        return outcome.eval_loss


def fail(trial: optuna.Trial, error: str) -> NoReturn:
    trial.set_user_attr("error", error)
    raise TrialFailed(f"trial {trial.number} failed: {error}")


def trial_folder(root: Path, number: int) -> Path:
    return root / "trials" / f"{number:04d}"


def run_child(spec: TrialSpec, folder: Path, threads: int,
              command: Sequence[str] = CHILD_COMMAND) -> Outcome:
    """Run the trial in `command` (a fresh Python by default); its output goes to log.txt."""
    shutil.rmtree(folder, ignore_errors=True)  # a trial number is new, unless rerun by hand
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trial.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    start = time.perf_counter()
    with (folder / "log.txt").open("w") as log:
        child = subprocess.Popen([*command, str(folder / "trial.json")], stdout=log,
                                 stderr=subprocess.STDOUT, env=child_env(threads))
        # wait4, not wait: it also returns the child's own peak RSS (Linux: KiB).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    outcome = read_outcome(folder / "result.json", child.returncode, folder / "log.txt")
    outcome.metrics["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    outcome.metrics["seconds"] = round(time.perf_counter() - start, 1)
    return outcome


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    # Idle OpenMP threads that spin slow every other process on a shared machine.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env[PARENT_ENV] = str(os.getpid())  # see trial.die_with_parent
    return env


def read_outcome(result: Path, returncode: int, log: Path) -> Outcome:
    if result.is_file():
        data = json.loads(result.read_text())
        return Outcome(data["status"], dict(data.get("metrics", {})), data.get("eval_loss"))
    if returncode < 0:
        name = signal.Signals(-returncode).name
        why = " (the kernel's OOM killer sends it when memory runs out)" if name == "SIGKILL" else ""
        error = f"the trial process was killed by {name}{why}"
    else:
        error = f"the trial process exited with status {returncode} without a result"
    tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.is_file() else []
    return Outcome("failed", {"error": error + (": " + " | ".join(tail) if tail else "")})

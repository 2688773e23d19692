"""The sweep: an Optuna study whose storage is the record of every trial.

The storage is SQLite in the output folder unless a database URL is given, so a killed sweep
resumes where it stopped (the study is loaded, not created) and several processes or machines
can work on one sweep through a shared database. `workers` trials run at once, each in its own
child process (see objective.py).

A resumed sweep first reruns the trials that the previous run left unfinished: those it finds
still RUNNING under a process of this host that no longer exists, and those that ended FAILED
without an error of their own (interrupted; on other hosts, Optuna's heartbeat marks them).
The sweep ends when the study holds `trials` finished trials: complete, pruned, or failed with
an error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from splice.config.base import ConfigError, doc
from splice.config.train import build_train_config
from splice.sweep.objective import Objective, TrialFailed, distribution, trial_folder
from splice.sweep.space import SweepSpace

HEARTBEAT_S, GRACE_S = 60, 180  # a trial with no heartbeat for GRACE_S is taken as dead
BEST = "best"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


@dataclass(frozen=True)
class SweepRun:
    """Where and how long a sweep runs."""

    output: str = doc("Sweep folder: the SQLite storage, trials/, best/, results and plots.")
    trials: int = doc("Finished trials the study should hold (complete, pruned or failed).",
                      default=12)
    workers: int = doc("Trials run at once, each in its own process.", default=1)
    storage: str | None = doc("Optuna storage URL (e.g. postgresql://host/db) shared by several "
                              "sweep processes; default sqlite:///<output>/sweep.db.", default=None)
    study_name: str = doc("Study name inside the storage.", default="sweep")
    keep_all: bool = doc("Keep every trial's adapter weights, not only the best.", default=False)

    def __post_init__(self) -> None:
        for name in ("trials", "workers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name} {value!r}: give a positive integer")
        if not self.output:
            raise ConfigError("--output is empty: give a folder for the sweep")

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.output).resolve() / 'sweep.db'}"


def open_storage(url: str, *, heartbeat: bool = True) -> optuna.storages.RDBStorage:
    # SQLite serialises writers; several trial processes reporting at once wait, not fail.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    beat = {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S,
            "heartbeat_stale_trial_callback": retry_callback()} if heartbeat else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine, **beat)


def make_pruner(name: str, startup_trials: int) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0)


def make_sampler(space: SweepSpace, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded with seed + `offset` (the trials the study already holds):
    a resumed or second sweep process must not replay the first one's random draws."""
    seed = space.seed + offset
    if space.sampler == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    if space.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(space.startup_trials, 1))


def open_study(run: SweepRun, space: SweepSpace,
               storage: optuna.storages.BaseStorage) -> optuna.Study:
    study = optuna.create_study(
        study_name=run.study_name, storage=storage, sampler=make_sampler(space),
        pruner=make_pruner(space.pruner, space.startup_trials), direction="minimize",
        load_if_exists=True)
    study.sampler = make_sampler(space, offset=len(study.get_trials(deepcopy=False)))
    return study


def check_same_space(study: optuna.Study, space: SweepSpace, where: str) -> None:
    """A resumed sweep keeps each knob's kind and list of values (ranges may move): Optuna
    cannot mix two lists of choices under one parameter name."""
    seen: dict[str, optuna.distributions.BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False):
        seen.update(trial.distributions)
    for knob in space.knobs:
        if knob.name not in seen:
            continue
        old = seen[knob.name]
        try:
            optuna.distributions.check_distribution_compatibility(old, distribution(knob))
        except ValueError:
            before = (list(old.choices) if isinstance(old, optuna.distributions.CategoricalDistribution)
                      else f"a range [{old.low}, {old.high}]{' (log)' if old.log else ''}")
            raise ConfigError(f"space.{knob.name}: the sweep in {where} searched it over {before}; "
                              "a resumed sweep keeps each knob's values. Restore them, or start a "
                              "new sweep (another --output or --study)") from None


def is_finished(trial: FrozenTrial) -> bool:
    """Counts toward --trials: complete, pruned, or failed with its own error."""
    return (trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (trial.state == TrialState.FAIL and "error" in trial.user_attrs))


def requeue_interrupted(study: optuna.Study, storage: optuna.storages.BaseStorage) -> int:
    """Mark this host's orphaned RUNNING trials failed, then queue every interrupted trial once
    more with the same knobs (Optuna's retry, which a grid sampler understands); returns how
    many were queued."""
    host, study_id = socket.gethostname(), storage.get_study_id_from_name(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host == host and pid.isdigit() and not process_alive(int(pid)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in retry_history(t)}
    interrupted = [t for t in trials if t.state == TrialState.FAIL and "error" not in t.user_attrs
                   and t.number not in retried and t.params]
    for trial in interrupted:
        retry_callback()(study, trial)
    return len(interrupted)


def retry_callback() -> optuna.storages.RetryHeartbeatStaleTrialCallback:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)


def retry_history(trial: FrozenTrial) -> list[int]:
    """The numbers of the trials this one reruns (empty for a first run)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(trial)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TrialCallback:
    """After each trial: keep the best adapter in <output>/best, drop the others' weights
    (unless keep_all), and stop starting trials once `total` are finished or under way."""

    def __init__(self, folder: Path, total: int, keep_all: bool) -> None:
        self.folder, self.total, self.keep_all = folder, total, keep_all
        self.lock = threading.Lock()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        print(progress_line(trial, sum(map(is_finished, trials)), self.total), file=sys.stderr,
              flush=True)
        with self.lock:
            if trial.state == TrialState.COMPLETE and study.best_trial.number == trial.number:
                keep_best(self.folder, trial)
            if not self.keep_all:
                drop_weights(trial_folder(self.folder, trial.number))
        under_way = sum(t.state == TrialState.RUNNING for t in trials)
        if sum(map(is_finished, trials)) + under_way >= self.total:
            study.stop()


def progress_line(trial: FrozenTrial, finished: int, total: int) -> str:
    knobs = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        what = f"eval loss {trial.value:.4f}"
    elif trial.state == TrialState.PRUNED:
        what = f"pruned at step {trial.user_attrs.get('pruned_at_step')}"
    else:
        what = f"failed: {trial.user_attrs.get('error', 'interrupted')}"
    return f"[{finished}/{total}] trial {trial.number} ({knobs}): {what}"


def keep_best(root: Path, trial: FrozenTrial) -> bool:
    """Copy the trial's folder to <root>/best (replacing the previous best in one rename)."""
    source = trial_folder(root, trial.number)
    if not (source / ADAPTER_FILES[0]).is_file():
        return False  # run on another host, or its weights are gone
    # Names of this process and thread: several sweep processes may share the folder.
    tag = f"{os.getpid()}-{threading.get_ident()}"
    tmp, old, best = root / f".best-{tag}.tmp", root / f".best-{tag}.old", root / BEST
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("checkpoints"))
    (tmp / "sweep_trial.txt").write_text(f"{trial.number}\n")
    with contextlib.suppress(FileNotFoundError):
        best.rename(old)
    tmp.rename(best)
    shutil.rmtree(old, ignore_errors=True)
    return True


def best_number(root: Path) -> int | None:
    marker = root / BEST / "sweep_trial.txt"
    return int(marker.read_text()) if marker.is_file() else None


def drop_weights(folder: Path) -> None:
    (folder / ADAPTER_FILES[0]).unlink(missing_ok=True)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    shutil.rmtree(folder / "model", ignore_errors=True)


def run_sweep(run: SweepRun, space: SweepSpace, base: Mapping[str, Any]) -> optuna.Study:
    """Run (or resume) the sweep until the study holds `run.trials` finished trials."""
    folder = Path(run.output)
    folder.mkdir(parents=True, exist_ok=True)
    build_train_config({**base, "output": str(folder)})  # a bad base fails before any trial
    storage = open_storage(run.storage_url())
    study = open_study(run, space, storage)
    check_same_space(study, space, run.storage or str(folder))
    requeue_interrupted(study, storage)
    remaining = run.trials - sum(map(is_finished, study.get_trials(deepcopy=False)))
    if remaining > 0:
        threads = max(1, (os.cpu_count() or 1) // run.workers)
        objective = Objective(space, base, folder, run.storage_url(), run.study_name, threads)
        study.optimize(objective, n_trials=remaining, n_jobs=run.workers, catch=(TrialFailed,),
                       callbacks=[TrialCallback(folder, run.trials, run.keep_all)])
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete and best_number(folder) != study.best_trial.number:
        keep_best(folder, study.best_trial)  # the run that found it was killed before copying
    return study

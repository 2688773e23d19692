"""`splice sweep` end to end on a tiny model: trials run in child processes; a NaN trial is
recorded as failed and the sweep goes on; a hopeless trial is pruned; the outputs hold exactly
the study's trials; the best adapter is kept; the printed command reproduces the winner; and a
sweep killed with SIGKILL resumes to the requested number of trials."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from splice.analysis import analyze_folder
from splice.cli import train as train_command
from splice.cli.main import build_parser, main
from splice.config.train import build_train_config
from splice.sweep.objective import TrialSpec, run_child
from splice.sweep.report import plot_importance, train_command as reproduce_command
from splice.sweep.study import is_finished, open_storage, retry_history

STEPS, EVAL_EVERY = 6, 2
GOOD_LR, NAN_LR, HOPELESS_LR = 5e-2, 1e30, 1e-7  # 1e30 overflows to NaN at step 2


def sweep_args(model: Path, data: tuple[Path, Path], space: Path, output: Path, trials: int) -> list[str]:
    return ["sweep", "--model", str(model), "--data", str(data[0]), "--eval-data", str(data[1]),
            "--space", str(space), "--trials", str(trials), "--steps", str(STEPS),
            "--output", str(output), "train.batch_size=4", "data.max_len=32"]


def write_space(path: Path, lrs: list[float], pruner: str = "none", extra: str = "",
                sampler: str = "grid") -> Path:
    path.write_text(f"sampler: {sampler}\npruner: {pruner}\nstartup_trials: 1\neval_every: {EVAL_EVERY}\n"
                    f"{extra}space:\n  lr: {json.dumps(lrs)}\n  rank: [2]\n  targets: [all-linear]\n")
    return path


def load(output: Path) -> optuna.Study:
    return optuna.load_study(study_name="sweep", storage=open_storage(f"sqlite:///{output / 'sweep.db'}",
                                                                       heartbeat=False))


@pytest.fixture(scope="module")
def finished(tiny_char_model, tiny_data, tmp_path_factory):
    """Three trials in this order: a good learning rate, one that turns the loss to NaN, and a
    hopeless one, which the median rule (after one complete trial) must prune."""
    folder = tmp_path_factory.mktemp("sweep")
    output = folder / "out"
    output.mkdir()
    space = write_space(folder / "s.yaml", [GOOD_LR, NAN_LR, HOPELESS_LR], pruner="median",
                        sampler="random")
    study = optuna.create_study(study_name="sweep", storage=f"sqlite:///{output / 'sweep.db'}")
    for lr in (GOOD_LR, NAN_LR, HOPELESS_LR):  # the sweep runs enqueued trials first, in order
        study.enqueue_trial({"lr": lr, "rank": 2, "targets": "all-linear"})
    assert main(sweep_args(tiny_char_model, tiny_data, space, output, trials=3)) == 0
    return output


def test_a_nan_trial_is_failed_with_its_error_and_the_sweep_goes_on(finished):
    by_lr = {t.params["lr"]: t for t in load(finished).trials}
    failed = by_lr[NAN_LR]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["error"].startswith("TrainingDiverged: the loss became nan")
    assert by_lr[GOOD_LR].state == TrialState.COMPLETE and by_lr[HOPELESS_LR].state != TrialState.FAIL


def test_a_hopeless_trial_is_pruned_at_its_first_eval(finished):
    study = load(finished)
    good, hopeless = ({t.params["lr"]: t for t in study.trials}[lr] for lr in (GOOD_LR, HOPELESS_LR))
    assert hopeless.state == TrialState.PRUNED
    assert hopeless.user_attrs["pruned_at_step"] == EVAL_EVERY == max(hopeless.intermediate_values)
    # the median rule with one complete trial: worse than that trial at the same step
    assert hopeless.intermediate_values[EVAL_EVERY] > good.intermediate_values[EVAL_EVERY]
    assert sorted(good.intermediate_values) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))


def test_results_hold_exactly_the_studys_trials_sorted(finished):
    study = load(finished)
    rows = list(csv.DictReader((finished / "results.csv").open()))
    assert sorted(int(r["trial"]) for r in rows) == sorted(t.number for t in study.trials)
    assert [r["state"] for r in rows] == ["complete", "pruned", "failed"]
    for r in rows:
        trial = study.trials[int(r["trial"])]
        assert float(r["lr"]) == trial.params["lr"]
        if trial.state == TrialState.COMPLETE:
            record = json.loads((finished / "best" / "training.json").read_text())["metrics"]
            assert float(r["eval_loss"]) == trial.value == record["eval_loss"]
            assert float(r["exact_match"]) == record["exact_match"]
            assert int(r["trainable_params"]) == record["trainable_params"] > 0
            assert int(r["adapter_bytes"]) == (finished / "best" / "adapter_model.safetensors").stat().st_size
            assert float(r["step_s"]) > 0 and float(r["peak_rss_mb"]) > 50
    table = (finished / "results.md").read_text()
    assert "3 trials: 1 complete, 1 pruned, 1 failed" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    assert [int(line.split("|")[1]) for line in lines] == [int(r["trial"]) for r in rows]
    assert (finished / "rank.png").stat().st_size > 1000


def test_the_best_adapter_is_kept_and_its_intruders_recorded(finished, tiny_char_model):
    best = load(finished).best_trial
    assert (finished / "best" / "sweep_trial.txt").read_text().strip() == str(best.number)
    analysis = analyze_folder(str(tiny_char_model), finished / "best")
    assert best.user_attrs["intruders"] == analysis.summary.intruder_dimensions
    # only the best adapter's weights are kept (no --keep-all)
    assert not list((finished / "trials").glob("*/adapter_model.safetensors"))


def test_the_printed_command_reproduces_the_winners_config(finished):
    values = load(finished).best_trial.user_attrs["config"]
    command = reproduce_command(values, output="elsewhere")
    args = build_parser().parse_args(shlex.split(command)[1:])
    reproduced = train_command.collect_config(args).to_dict()
    expected = build_train_config({**values, "output": "elsewhere"}).to_dict()
    expected["train"]["eval_every"] = reproduced["train"]["eval_every"]  # sweep bookkeeping only
    assert reproduced == expected


def test_a_resumed_sweep_must_keep_each_knobs_values(finished, tiny_char_model, tiny_data,
                                                      tmp_path, capsys):
    before = [(t.number, t.state) for t in load(finished).trials]
    changed = write_space(tmp_path / "changed.yaml", [1e-3])
    assert main(sweep_args(tiny_char_model, tiny_data, changed, finished, trials=4)) == 2
    message = capsys.readouterr().err
    assert "space.lr: the sweep in" in message and str([GOOD_LR, NAN_LR, HOPELESS_LR]) in message
    assert [(t.number, t.state) for t in load(finished).trials] == before


def test_importance_plot_from_optuna(tmp_path):
    study = optuna.create_study()
    study.optimize(lambda t: (t.suggest_int("rank", 1, 64) - 16) ** 2 + t.suggest_float("lr", 0, 1),
                   n_trials=30)
    assert plot_importance(study, tmp_path / "i.png") == tmp_path / "i.png"
    few = optuna.create_study()
    few.optimize(lambda t: t.suggest_float("lr", 0, 1), n_trials=1)
    assert plot_importance(few, tmp_path / "none.png") is None


def test_a_trial_process_killed_from_outside_is_a_failed_trial(tmp_path):
    spec = TrialSpec({}, "sqlite://", "s", 0, "none", 0, False)
    killed = run_child(spec, tmp_path / "k", threads=1, command=(
        sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))
    assert killed.status == "failed" and "killed by SIGKILL" in killed.metrics["error"]
    assert killed.metrics["peak_rss_mb"] > 1
    crashed = run_child(spec, tmp_path / "c", threads=1, command=(
        sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"))
    assert crashed.status == "failed" and crashed.metrics["error"] == (
        "the trial process exited with status 3 without a result: boom")


def processes_running(needle: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and needle in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_sweep_resumes_to_the_requested_trials(tiny_char_model, tiny_data, tmp_path):
    output = tmp_path / "out"
    space = write_space(tmp_path / "s.yaml", [5e-2, 3e-2, 2e-2], extra="intruders: false\n")
    args = sweep_args(tiny_char_model, tiny_data, space, output, trials=3)
    sweep = subprocess.Popen([sys.executable, "-m", "splice", *args], stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    # kill once one trial is complete and the next one's process has started
    while not ((output / "trials/0000/result.json").exists() and (output / "trials/0001/log.txt").exists()):
        assert sweep.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
    # its trial process dies with it (at once, or as soon as its imports are done)
    while processes_running(str(output / "trials")):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert not (output / "trials/0001/result.json").exists()  # it did not train on to the end
    before = {t.number: t for t in load(output).trials}
    assert before[0].state == TrialState.COMPLETE

    assert main(args) == 0
    after = load(output).trials
    assert sum(map(is_finished, after)) == 3
    assert all(t.state != TrialState.RUNNING for t in after)
    assert after[0].value == before[0].value and after[0].datetime_complete == before[0].datetime_complete
    assert sorted(t.params["lr"] for t in after if is_finished(t)) == [2e-2, 3e-2, 5e-2]
    for number, trial in before.items():
        if trial.state == TrialState.RUNNING:  # interrupted: rerun with the same knobs
            assert after[number].state == TrialState.FAIL
            retry = [t for t in after if retry_history(t) == [number]]
            assert len(retry) == 1 and retry[0].params == trial.params and is_finished(retry[0])
    rows = list(csv.DictReader((output / "results.csv").open()))
    assert sorted(int(r["trial"]) for r in rows) == [t.number for t in after]

"""Data parallel: `torchrun --nproc_per_node 2 -m splice train` matches one process at the same
global batch, and only rank 0 writes to the output folder.

Two ranks x batch_size 2 x grad_accum 1 see the same micro-batches per optimizer step as one
process x batch_size 2 x grad_accum 2: `epoch_groups` cuts each step's `grad_accum x world`
micro-batches and rank r takes group[r::world]. The loss is normalised by the global count of
supervised tokens, so per-step losses and the trained adapter agree to float rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from splice.config.train import build_train_config
from splice.train.metrics import read_metrics
from splice.train.run import run_training

pytestmark = pytest.mark.integration  # needs SmolLM2's tokenizer from the bundled package

TIMEOUT_S = 240
"""A rank that dies can leave the other blocked in a collective; never wait forever."""
STOP_S = 60
"""How long torchrun may take to stop its ranks after a timeout."""

STEPS, LR, RANK, SEED = 4, 1e-2, 4, 5

# Imported at start-up by every rank (it is first on PYTHONPATH): on ranks other than 0, an audit
# hook records every write, directory creation, rename or removal under the output folder, and
# (to test failure handling) makes opening GUARD_FAIL_OPEN raise.
GUARD = textwrap.dedent('''
    import os, sys

    OUTPUT = os.path.realpath(os.environ["GUARD_OUTPUT"])
    LOG = os.environ["GUARD_LOG"]
    FAIL_OPEN = os.environ.get("GUARD_FAIL_OPEN")
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path):
        if isinstance(path, int):
            return False
        path = os.path.realpath(os.fsdecode(path))
        return path == OUTPUT or path.startswith(OUTPUT + os.sep)

    def writes(event, args):
        if event == "open":
            mode, flags = args[1], args[2]
            return (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool(flags & WRITE_FLAGS)
        return event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree")

    def hook(event, args):
        if event == "open" and FAIL_OPEN and args[0] == FAIL_OPEN:
            raise OSError(f"rank {os.environ['RANK']}: injected failure opening {FAIL_OPEN}")
        if args and writes(event, args) and inside(args[0]):
            with open(LOG, "a") as log:
                log.write(f"rank {os.environ['RANK']}: {event} {args[0]}\\n")

    if os.environ.get("RANK", "0") != "0":
        sys.addaudithook(hook)
''')


def train_args(model: Path, data: Path, output: Path, batch_size: int, grad_accum: int) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--output", str(output), "--max-len", "64",
            "--rank", str(RANK), "--dropout", "0", "--lr", str(LR), "--steps", str(STEPS),
            "--batch-size", str(batch_size), "--grad-accum", str(grad_accum), "--seed", str(SEED),
            "--save-every", "2", "--no-progress"]


def run_torchrun(args: list[str], tmp_path: Path, output: Path,
                 fail_open: Path | None = None) -> subprocess.CompletedProcess:
    """Run `torchrun --nproc_per_node 2 -m splice train ARGS` under the guard."""
    guard_dir = tmp_path / "guard"
    guard_dir.mkdir()
    (guard_dir / "sitecustomize.py").write_text(GUARD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GUARD_OUTPUT": str(output),
           "GUARD_LOG": str(tmp_path / "guard.log"), "GUARD_FAIL_OPEN": str(fail_open or ""),
           "PYTHONPATH": os.pathsep.join([str(guard_dir), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "splice", "train", *args]
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: torchrun then stops its ranks (each in a session of its own).
            process.terminate()
            try:
                stderr = process.communicate(timeout=STOP_S)[1][-4000:]
            except subprocess.TimeoutExpired:
                process.kill()
                stderr = f"(the ranks did not stop within {STOP_S} s of SIGTERM)"
            pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s (a rank hung):\n{stderr}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def guard_log(tmp_path: Path) -> str:
    log = tmp_path / "guard.log"
    return log.read_text() if log.exists() else ""


def losses(output: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(output / "metrics.jsonl")]


def test_two_ranks_match_one_process_at_the_same_global_batch(tiny_chat_model, tiny_data, tmp_path):
    two = tmp_path / "two"
    done = run_torchrun(train_args(tiny_chat_model, tiny_data[0], two, 2, 1), tmp_path, two)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-4000:]
    written = guard_log(tmp_path)
    assert written == "", f"a rank other than 0 wrote to the output folder:\n{written}"

    values = {"model": str(tiny_chat_model), "output": str(tmp_path / "one"),
              "data": {"path": str(tiny_data[0]), "max_len": 64},
              "adapter": {"rank": RANK, "dropout": 0.0},
              "train": {"lr": LR, "steps": STEPS, "batch_size": 2, "grad_accum": 2, "seed": SEED,
                        "save_every": 2}}
    one = run_training(build_train_config(values), show_progress=False).output

    # metrics.jsonl holds each step once (one writer), with the single process's losses
    reference, parallel = losses(one), losses(two)
    assert [s for s, _ in parallel] == [s for s, _ in reference] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(reference, parallel):
        assert abs(a - b) <= 1e-5, (step, a, b)

    expected = load_file(one / "adapter_model.safetensors")
    trained = load_file(two / "adapter_model.safetensors")
    assert expected.keys() == trained.keys()
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)
    for name in expected:
        torch.testing.assert_close(trained[name], expected[name], rtol=0, atol=1e-5, msg=name)

    checkpoints = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert checkpoints == ["step-00000002", "step-00000004"]  # no leftover .tmp- folders
    assert (two / "training.json").is_file() and (two / "loss_curve.png").is_file()


def test_one_rank_failing_ends_the_run_instead_of_hanging(tiny_chat_model, tiny_data, tmp_path):
    # Rank 1 cannot read the data after joining the process group; rank 0 goes on to wrap the
    # model, a collective rank 1 never joins. The run must end with an error, not wait forever
    # (gloo sees the peer gone and torchrun stops the group; the subprocess timeout backs this).
    data = tmp_path / "train.jsonl"
    data.write_bytes(tiny_data[0].read_bytes())
    out = tmp_path / "out"
    done = run_torchrun(train_args(tiny_chat_model, data, out, 2, 1), tmp_path, out, fail_open=data)
    assert done.returncode != 0
    assert "injected failure opening" in done.stderr, done.stderr[-4000:]
    assert not (out / "adapter_model.safetensors").exists()

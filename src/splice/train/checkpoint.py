"""Training checkpoints: everything needed to continue a run to the same losses.

A checkpoint is a folder `step-00000100/` holding the trainable tensors and the optimizer's
tensors (safetensors: nothing is pickled), the scheduler/step/RNG bookkeeping (JSON + one RNG
tensor file). It is written under a temporary name and renamed into place, so a crash mid-write
never leaves a half checkpoint; only the last K are kept.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREFIX = "step-"


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, and the position in the data."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split optimizer state into tensors (for safetensors) and JSON-able bookkeeping."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: Progress, keep_last: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{progress.step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    try:
        save_file(trainable_tensors(model), tmp / "trainable.safetensors")
        opt_tensors, opt_meta = optimizer_tensors(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state()}, tmp / "rng.safetensors")
        meta = {"progress": asdict(progress), "optimizer": opt_meta,
                "scheduler": scheduler.state_dict(), "python_random": random.getstate()}
        (tmp / "trainer.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(folder, keep_last)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def prune(folder: Path, keep_last: int) -> None:
    for old in list_checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> Progress:
    """Restore a run from `path`; returns where to continue."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in load_file(path / "trainable.safetensors").items():
            params[name].copy_(value)
    meta = json.loads((path / "trainer.json").read_text())
    restore_optimizer(optimizer, load_file(path / "optimizer.safetensors"), meta["optimizer"])
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(load_file(path / "rng.safetensors")["torch"])
    state = meta["python_random"]
    random.setstate((state[0], tuple(state[1]), state[2]))
    return Progress(**meta["progress"])

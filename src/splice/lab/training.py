"""The Train panel: a small LoRA trained live on the loaded model, step by step, with controls.

A background thread trains; each step appends an event (loss, ‖ΔW‖ per adapted module) that
the page reads as server-sent events. Event k describes the adapter after k updates: the loss
of the toy batch at those weights and ‖ΔW‖_F = ‖s·B·A‖_F per module. B starts at zero, so
event 0 shows every norm at exactly 0 and the base model's loss.

Training runs on a private copy of the loaded model (made at the first play), so merges in the
Library panel never change the weights being trained, and training never changes the answers
there.
"""

from __future__ import annotations

import copy
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.config.base import ConfigError, doc
from splice.config.lora import LoRAConfig
from splice.core.attach import attach, delete_adapter, list_adapters
from splice.core.layer import adapter_layers
from splice.train.batching import Batch, collate
from splice.train.data import load_jsonl
from splice.train.loss import causal_lm_loss

TOY_TASK = Path(__file__).parent / "data" / "toy_task.jsonl"
"""Person records to one key=value line: a few lines of the demo task (data/demo)."""
ADAPTER = "lab"
STATES = ("idle", "running", "paused", "done", "stopped", "failed")


@dataclass(frozen=True)
class TrainSettings:
    """What the Train panel trains: small enough that a step takes about a second on a CPU."""

    rank: int = doc("LoRA rank r.", default=8)
    targets: tuple[str, ...] = doc("Modules to adapt (last names).", default=("q_proj", "v_proj"))
    steps: int = doc("Optimizer steps per run.", default=40)
    lr: float = doc("AdamW learning rate (constant: the curve shows the optimizer alone).",
                    default=3e-3)
    examples: int = doc("Toy-task examples in the (single, full) batch.", default=4)
    max_len: int = doc("Tokens per example at most.", default=256)
    seed: int = doc("Seed of A's initialisation.", default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("rank", "steps", "examples", "max_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: give a positive integer")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr={self.lr!r}: give a positive learning rate (e.g. 3e-3)")
        if not self.targets:
            raise ConfigError("targets=(): name at least one module to adapt (e.g. q_proj)")

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, target_modules=self.targets)


@dataclass
class _Run:
    """One press of play until done or stop: its events, in order."""

    number: int
    state: str = "running"
    events: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""


class TrainSession:
    """Play / pause / stop a training run of `settings` on a copy of `model`."""

    def __init__(self, model: nn.Module, tokenizer, settings: TrainSettings = TrainSettings(),
                 data: Path = TOY_TASK) -> None:
        self.source, self.tokenizer, self.settings, self.data = model, tokenizer, settings, data
        self.model: nn.Module | None = None
        self.run: _Run | None = None
        self._lock = threading.Lock()
        self._resume = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- controls -----------------------------------------------------------------------------
    def play(self) -> dict[str, Any]:
        """Start a new run, or resume a paused one."""
        with self._lock:
            if self.run is not None and self.run.state == "paused":
                self.run.state = "running"
                self._resume.set()
            elif self.run is None or self.run.state != "running":
                if self._thread is not None:
                    self._thread.join()  # a finished run's thread may still be returning
                self.run = _Run(self.run.number + 1 if self.run else 1)
                self._stop.clear()
                self._resume.set()
                self._thread = threading.Thread(target=self._train, args=(self.run,),
                                                name="splice-lab-train", daemon=True)
                self._thread.start()
            return self.status()

    def pause(self) -> dict[str, Any]:
        with self._lock:
            if self.run is not None and self.run.state == "running":
                self.run.state = "paused"
                self._resume.clear()
            return self.status()

    def stop(self) -> dict[str, Any]:
        with self._lock:
            if self.run is not None and self.run.state in ("running", "paused"):
                self._stop.set()
                self._resume.set()
            thread = self._thread
        if thread is not None:
            thread.join()
        return self.status()

    def status(self) -> dict[str, Any]:
        run = self.run
        if run is None:
            return {"run": 0, "state": "idle", "step": None, "steps": self.settings.steps}
        last = run.events[-1]["step"] if run.events else None
        return {"run": run.number, "state": run.state, "step": last,
                "steps": self.settings.steps, "error": run.error}

    def events_since(self, run_number: int, index: int) -> tuple[list[dict[str, Any]], bool]:
        """Events of run `run_number` from `index` on, and whether that run is over."""
        run = self.run
        if run is None or run.number != run_number:
            return [], True
        return run.events[index:], run.state in ("done", "stopped", "failed")

    # -- the run ------------------------------------------------------------------------------
    def _train(self, run: _Run) -> None:
        try:
            model = self._fresh_adapter()
            batch = self._batch()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=self.settings.lr, weight_decay=0.0)
            model.train()
            start = time.perf_counter()
            for step in range(self.settings.steps + 1):
                self._resume.wait()
                if self._stop.is_set():
                    break
                last = step == self.settings.steps
                with torch.set_grad_enabled(not last):
                    loss = batch_loss(model, batch)
                run.events.append({"run": run.number, "step": step, "steps": self.settings.steps,
                                   "loss": loss.item(), "norms": delta_norms(model, ADAPTER),
                                   "elapsed_s": time.perf_counter() - start})
                if not last:
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            model.eval()
            run.state = "stopped" if self._stop.is_set() else "done"
        except Exception as err:  # the page shows it; the server keeps serving
            run.error = f"{type(err).__name__}: {err}"
            run.state = "failed"

    def _fresh_adapter(self) -> nn.Module:
        """The private copy with a new, zero-update LoRA adapter (the previous run's removed)."""
        if self.model is None:
            self.model = copy.deepcopy(self.source)
        if ADAPTER in list_adapters(self.model):
            delete_adapter(self.model, ADAPTER)
        torch.manual_seed(self.settings.seed)
        return attach(self.model, self.settings.lora_config(), ADAPTER)

    def _batch(self) -> Batch:
        dataset = load_jsonl(self.data, self.tokenizer, max_len=self.settings.max_len)
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return collate(dataset.examples[: self.settings.examples], pad)


def batch_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's supervised tokens (the completions)."""
    return causal_lm_loss(model, batch.input_ids, batch.attention_mask, batch.labels)


@torch.no_grad()
def delta_norms(model: nn.Module, name: str) -> dict[str, float]:
    """‖ΔW‖_F of adapter `name` per module path, in model order (ΔW from `delta_weight`)."""
    return {path: torch.linalg.matrix_norm(layer.delta_weight(name)).item()
            for path, layer in adapter_layers(model) if layer.has_adapter(name)}

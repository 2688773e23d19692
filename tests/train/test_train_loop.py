"""The training loop end to end on a tiny model: outputs, exact resume, NaN stop, Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

import splice
from splice.config.train import build_train_config
from splice.train import loop as loop_module
from splice.train.checkpoint import list_checkpoints
from splice.train.loop import TrainingDiverged, TrainingInterrupted
from splice.train.metrics import read_metrics
from splice.train.run import run_training


def make_config(model: Path, data: tuple[Path, Path], output: Path, **train):
    values = {"model": str(model), "output": str(output),
              "data": {"path": str(data[0]), "eval_path": str(data[1]), "max_len": 64},
              "adapter": {"method": train.pop("method", "lora"), "rank": 4, "dropout": 0.1},
              "train": {"lr": 5e-3, "steps": 6, "batch_size": 4, "seed": 3, **train}}
    return build_train_config(values)


pytestmark = pytest.mark.integration  # needs SmolLM2's tokenizer from the bundled package


def losses(output: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output / "metrics.jsonl") if "loss" in r}


def test_run_writes_adapter_metrics_plot_and_training_json(tiny_chat_model, tiny_data, tmp_path):
    result = run_training(make_config(tiny_chat_model, tiny_data, tmp_path / "run", eval_every=3),
                          show_progress=False)
    out = result.output
    for name in ("adapter_config.json", "adapter_model.safetensors", "training.json",
                 "metrics.jsonl", "loss_curve.png"):
        assert (out / name).is_file(), name
    record = json.loads((out / "training.json").read_text())
    model, _ = splice.load_model(str(tiny_chat_model))
    assert record["base_model_fingerprint"] == splice.models.model_fingerprint(model)
    assert record["metrics"]["steps"] == 6 and record["metrics"]["eval_loss"] is not None
    assert len(losses(out)) == 6
    # the saved adapter reproduces the trained model's eval loss when loaded on the base
    splice.load_adapter(model, out)
    weights = load_file(out / "adapter_model.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


def interrupt_then_resume(config, monkeypatch, after_step: int):
    """Run until Ctrl-C arrives after `after_step` steps, check the saved checkpoint, resume."""
    real_step = loop_module.train_step

    def interrupt(state, *args, **kwargs):
        if state.progress.step == after_step:
            raise KeyboardInterrupt
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(loop_module, "train_step", interrupt)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        run_training(config, show_progress=False)
    newest = list_checkpoints(Path(config.output) / "checkpoints")[-1].name
    assert newest == f"step-{after_step:08d}"
    monkeypatch.setattr(loop_module, "train_step", real_step)
    return run_training(config, resume=True, show_progress=False)


def test_resume_reproduces_the_uninterrupted_losses(tiny_chat_model, tiny_data, tmp_path, monkeypatch):
    straight = run_training(make_config(tiny_chat_model, tiny_data, tmp_path / "a", save_every=2),
                            show_progress=False)
    config = make_config(tiny_chat_model, tiny_data, tmp_path / "b", save_every=2)
    resumed = interrupt_then_resume(config, monkeypatch, after_step=3)
    a, b = losses(straight.output), losses(resumed.output)
    assert a.keys() == b.keys() == set(range(1, 7))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_a_second_run_into_the_same_folder_must_say_resume(tiny_chat_model, tiny_data, tmp_path):
    config = make_config(tiny_chat_model, tiny_data, tmp_path / "c", save_every=3)
    run_training(config, show_progress=False)
    with pytest.raises(splice.SpliceError, match="--resume"):
        run_training(config, show_progress=False)


def test_nan_loss_stops_with_the_last_good_checkpoint_intact(tiny_chat_model, tiny_data, tmp_path, monkeypatch):
    config = make_config(tiny_chat_model, tiny_data, tmp_path / "d", save_every=2)
    real_loss = loop_module.LossModule.forward
    calls = {"n": 0}

    def nan_on_fifth_batch(self, batch):
        calls["n"] += 1
        loss = real_loss(self, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(loop_module.LossModule, "forward", nan_on_fifth_batch)
    with pytest.raises(TrainingDiverged, match="step 5"):
        run_training(config, show_progress=False)
    checkpoints = list_checkpoints(tmp_path / "d" / "checkpoints")
    assert checkpoints[-1].name == "step-00000004"
    saved = load_file(checkpoints[-1] / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_full_fine_tuning_trains_every_weight_and_saves_a_model(tiny_chat_model, tiny_data, tmp_path):
    result = run_training(make_config(tiny_chat_model, tiny_data, tmp_path / "e", method="full", steps=2),
                          show_progress=False)
    assert result.trainable == result.total
    reloaded = LlamaForCausalLM.from_pretrained(result.output / "model")
    base, _ = splice.load_model(str(tiny_chat_model))
    changed = [n for n, p in reloaded.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) == len(list(base.parameters()))

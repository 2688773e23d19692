"""`train.optimizer` end to end: paged AdamW is AdamW exactly; 8-bit AdamW tracks it and resumes."""

from __future__ import annotations

import functools

import pytest
import torch
from safetensors.torch import load_file

from splice.optim import AdamW8bit, factory
from splice.train.run import run_training
from test_train_loop import interrupt_then_resume, losses, make_config

pytestmark = pytest.mark.integration  # SmolLM2's tokenizer from the bundled package


def test_paged_adamw_trains_to_exactly_adamws_losses(tiny_chat_model, tiny_data, tmp_path):
    plain = run_training(make_config(tiny_chat_model, tiny_data, tmp_path / "a"), show_progress=False)
    paged = run_training(make_config(tiny_chat_model, tiny_data, tmp_path / "p", optimizer="paged_adamw"),
                         show_progress=False)
    assert losses(paged.output) == losses(plain.output)


def test_adamw8bit_tracks_adamw_and_resumes_exactly(tiny_chat_model, tiny_data, tmp_path, monkeypatch):
    # The tiny model's LoRA tensors are under the 4,096-element default for 8-bit state: lower it
    # so every moment here really is stored in 8 bits.
    monkeypatch.setitem(factory._BUILDERS, "adamw8bit",
                        functools.partial(AdamW8bit, block_size=64, min_8bit_size=64))
    plain = losses(run_training(make_config(tiny_chat_model, tiny_data, tmp_path / "a"),
                                show_progress=False).output)
    straight = run_training(make_config(tiny_chat_model, tiny_data, tmp_path / "q", optimizer="adamw8bit",
                                        save_every=2), show_progress=False)
    eight = losses(straight.output)
    state = load_file(straight.output / "checkpoints" / "step-00000006" / "optimizer.safetensors")
    assert any(t.dtype == torch.uint8 for t in state.values())
    assert eight.keys() == plain.keys()
    assert eight[1] == plain[1]                      # same weights before the first update
    assert max(abs(eight[s] - plain[s]) / plain[s] for s in plain) < 0.02
    config = make_config(tiny_chat_model, tiny_data, tmp_path / "r", optimizer="adamw8bit", save_every=2)
    resumed = losses(interrupt_then_resume(config, monkeypatch, after_step=3).output)
    for step in eight:
        assert abs(eight[step] - resumed[step]) <= 1e-6, step

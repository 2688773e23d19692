"""Adapters follow the model's train/eval mode from the moment they are attached."""

from __future__ import annotations

import torch

import splice
from helpers import logits, randomize_adapter, token_ids
from splice.quant import quantize_model


def test_an_adapter_attached_to_a_model_in_eval_mode_runs_without_dropout(tiny_llama):
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, dropout=0.5, target_modules="all-linear"))
    randomize_adapter(tiny_llama, scale=0.5)
    ids = token_ids(tiny_llama)
    assert all(not m.training for m in tiny_llama.modules())
    assert torch.equal(logits(tiny_llama, ids), logits(tiny_llama, ids))
    tiny_llama.train()
    torch.manual_seed(0)
    first = logits(tiny_llama, ids)
    assert not torch.equal(first, logits(tiny_llama, ids))


def test_quantized_layers_keep_the_mode_of_the_layers_they_replace(tiny_llama):
    quantize_model(tiny_llama)
    assert all(not m.training for m in tiny_llama.modules())

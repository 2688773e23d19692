"""LoRA's fused autograd path behaves like any other module output."""

from __future__ import annotations

import torch
from torch import nn

import splice


def test_lora_output_can_be_modified_in_place_under_autograd():
    layer = nn.Linear(16, 24, bias=True)
    model = nn.Sequential(layer)
    splice.attach(model, splice.LoRAConfig(rank=2, target_modules=["0"]))
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = model(x)
    y.mul_(2.0)          # raised "is a view and is being modified inplace" before
    y.sum().backward()
    assert x.grad is not None

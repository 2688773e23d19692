"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): a small residual MLP after a
sub-layer's output.

    h = W₀x + b₀                                            the wrapped module's output, (..., d)
    y = h + W_up·act(W_down·dropout(h) + b_down) + b_up      W_down: (m, d), W_up: (d, m)

W_down starts kaiming-uniform (a=√5), b_down at zero; W_up and b_up start at zero, so y = h and
the adapted model equals the base model at step 0. Several active adapters each read h and their
outputs add. The MLP is nonlinear in h, so it cannot be folded into W₀: not mergeable.

File format (splice's own; peft cannot load it), in the folder layout of peft's adapter format:

    adapter_config.json
        "peft_type": "SPLICE_BOTTLENECK", "placement": "houlsby" | "pfeiffer",
        "target_modules": [...], "bottleneck_size": m, "activation": "relu" | "gelu" | "silu",
        "dropout": p, "modules_to_save", "layers_to_transform", "layers_pattern": [...] | null,
        and the shared "task_type", "base_model_name_or_path", "revision", "inference_mode"
    adapter_model.safetensors, per adapted module at model path P, keyed base_model.model.P.…:
        P.adapter_down.weight (m, d)    P.adapter_down.bias (m,)
        P.adapter_up.weight (d, m)      P.adapter_up.bias (d,)
        and full copies of modules_to_save under P.modules_to_save.…

d is the wrapped module's output width (out_features; for GPT-2's Conv1D, weight.shape[1]). The
peft_type names no peft method, so a peft reader stops at it instead of misreading the tensors,
and its SPLICE_ prefix keeps it apart from any type peft may add.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from splice.config.bottleneck import BottleneckConfig
from splice.core.layer import AdapterLayer
from splice.core.registry import MethodSpec, implements, register_method
from splice.core.targets import Conv1D
from splice.methods.lora import adapter_factory, linear_shape

register_method(MethodSpec(
    name="adapter", config_cls=BottleneckConfig, peft_type=BottleneckConfig.peft_type,
    file_format="splice",
    trains="a bottleneck MLP (down, activation, up) after chosen sub-layers", mergeable=False,
    why_not_mergeable="it adds layers (a nonlinear bottleneck MLP) that cannot be folded into a "
                      "weight"))

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu}


@implements("adapter", nn.Linear, *((Conv1D,) if Conv1D else ()))
class BottleneckLinear(AdapterLayer):
    """x ↦ h + up(act(down(dropout(h)))) with h = base(x), for nn.Linear or Conv1D."""

    adapter_prefixes = ("adapter_down", "adapter_up", "adapter_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        self.activation: dict[str, str] = {}

    def add_adapter(self, name: str, config: BottleneckConfig, module_path: str) -> None:
        factory = adapter_factory(self.base_weight())
        size, width = config.bottleneck_size, self.out_features
        down = nn.Linear(width, size, **factory)
        up = nn.Linear(size, width, **factory)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)
        self.adapter_down[name], self.adapter_up[name] = down, up
        dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.adapter_dropout[name] = dropout
        self.activation[name] = config.activation

    def forget_adapter(self, name: str) -> None:
        self.activation.pop(name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        h = self.base_layer(x)                                     # (..., d)
        result = h
        for name in self.adapters_to_apply():
            down, up = self.adapter_down[name], self.adapter_up[name]
            z = down(self.adapter_dropout[name](h.to(down.weight.dtype)))   # (..., m)
            result = result + up(ACTIVATION_FNS[self.activation[name]](z)).to(h.dtype)
        return result

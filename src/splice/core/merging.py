"""Fold adapters into the base weights and take them out again, explicitly.

Nothing merges behind the user's back (not on eval(), not in forward): merging is a call, and
`disable_adapters` scopes an unmerge to a `with` block. ΔW comes from each layer's
`delta_weight`; the arithmetic runs in fp32 and is cast back to the weight's dtype once.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from splice.core.errors import AdapterError
from splice.core.layer import adapter_layers
from splice.core.modules_to_save import ModulesToSaveLayer
from splice.core.registry import method_for_config
from splice.core.state import require_adapter, require_state


def merged_adapter_names(model: nn.Module) -> list[str]:
    names: list[str] = []
    for _, layer in adapter_layers(model):
        names += [n for n in layer.merged_adapters if n not in names]
    return names


def check_mergeable(model: nn.Module, name: str) -> None:
    spec = method_for_config(require_adapter(model, name).config)
    if not spec.mergeable:
        raise AdapterError(f"adapter {name!r} ({spec.name}) cannot be merged: "
                           f"{spec.why_not_mergeable}. Keep it unmerged (it runs as is).")


def fold_base(layer, name: str, sign: int) -> None:
    """Merge (sign=+1) or take out (sign=-1) adapter `name` in the layer's base weight and bias."""
    weight = layer.base_weight()
    weight.copy_(layer.fold_into(weight.detach(), name, sign))
    bias = getattr(layer.base_layer, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.copy_(layer.fold_bias_into(bias.detach(), name, sign))


@torch.no_grad()
def merge_adapter(model: nn.Module, names: str | Sequence[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights: W ← W + ΔW."""
    state = require_state(model)
    names = list(state.active) if names is None else ([names] if isinstance(names, str) else list(names))
    for name in names:
        check_mergeable(model, name)
    for name in names:
        for _, layer in adapter_layers(model):
            if isinstance(layer, ModulesToSaveLayer) or not layer.has_adapter(name):
                continue
            if name in layer.merged_adapters:
                raise AdapterError(f"adapter {name!r} is already merged")
            fold_base(layer, name, +1)
            layer.merged_adapters.append(name)


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights, newest first: W ← W − ΔW."""
    for _, layer in adapter_layers(model):
        while layer.merged_adapters:
            name = layer.merged_adapters[-1]
            fold_base(layer, name, -1)
            layer.merged_adapters.pop()


@torch.no_grad()
def merge_and_unload(model: nn.Module, names: str | Sequence[str] | None = None) -> nn.Module:
    """Fold adapters (default: the active ones) into the base and remove every wrapper.

    Returns the same model object, now a plain model of the base class with the base's parameter
    count: `save_pretrained` writes it and the model library alone reloads it."""
    state = require_state(model)
    names = list(state.active) if names is None else ([names] if isinstance(names, str) else list(names))
    pending = [n for n in names if n not in merged_adapter_names(model)]
    merge_adapter(model, pending)
    for path, layer in list(adapter_layers(model)):
        layer.detach_from(model, path, replacement_for(layer, names))
    for param_name, param in model.named_parameters():
        param.requires_grad_(state.base_requires_grad.get(param_name, True))
    model.__dict__.pop("splice_adapters", None)
    return model


def replacement_for(layer: nn.Module, names: Sequence[str]) -> nn.Module:
    """What stands in a wrapper's place after merging: the base, or a trained full copy."""
    if isinstance(layer, ModulesToSaveLayer):
        for name in names:
            if name in layer.modules_to_save:
                return layer.modules_to_save[name]
    return layer.base_layer

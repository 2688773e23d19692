"""Hot-swap: another LoRA adapter's weights into an attached adapter's tensors, in place.

    splice.attach(model, splice.LoRAConfig(rank=16, target_modules="all-linear"), "slot")
    compiled = torch.compile(model)
    splice.hotswap_adapter(model, "slot", "adapters/math")    # no reload, no recompile

Every parameter keeps its identity, shape, dtype and device, and each module's scale s stays the
float it was (a compiled graph holds it as a constant): the new adapter's scale s' is folded into
its B as (s'/s)·B, so s·B'·A equals the new adapter's s'·B·A. A new adapter of a lower rank r
fills the slot's rank R with zero rows of A and zero columns of B, which add nothing (create the
slot with the largest rank you will swap in). A module the slot adapts but the new adapter does
not gets a zero update. Routed stacks and DoRA's cached norms follow by their version counters.
"""

from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from splice.config.base import AdapterConfig
from splice.core.errors import AdapterError
from splice.core.io import read_adapter_folder
from splice.core.keys import adapter_tensors
from splice.core.layer import AdapterLayer, adapter_layers
from splice.core.state import require_adapter

#: file key suffix of a LoRA factor -> its rank dimension (A: (r, in), B: (out, r))
RANK_DIM = {"lora_A.weight": 0, "lora_embedding_A": 0, "lora_B.weight": 1, "lora_embedding_B": 1}
B_FACTORS = ("lora_B.weight", "lora_embedding_B")


def hotswap_adapter(model: nn.Module, name: str,
                    source: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
    """Copy the adapter in `source` into adapter `name`'s tensors in place (see the module doc).

    `source` is an adapter folder (splice's or peft's format) or its tensors keyed as in the file;
    bare tensors are taken at the slot's scales. Everything is checked before anything is copied:
    on an error the model is unchanged."""
    entry = require_adapter(model, name)
    weights, config = read_source(source)
    if config is not None and config.method != entry.config.method:
        raise AdapterError(f"the new weights are a {config.method} adapter but {name!r} is a "
                           f"{entry.config.method} adapter; hot-swap within one method, or attach "
                           "it as a new adapter with splice.load_adapter")
    for path, layer in adapter_layers(model):
        if name in layer.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; call "
                               "splice.unmerge_adapter(model) before hot-swapping it")
    layer_values, base_values = plan_swap(model, name, weights, config)
    for layer, values in layer_values:
        layer.load_file_tensors(name, values)
    with torch.no_grad():
        for target, value in base_values:
            target.copy_(value)


def read_source(source: str | os.PathLike | Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], AdapterConfig | None]:
    if isinstance(source, Mapping):
        return dict(source), None
    config, weights = read_adapter_folder(source)
    return weights, config


def plan_swap(model: nn.Module, name: str, weights: dict[str, torch.Tensor],
              config: AdapterConfig | None
              ) -> tuple[list[tuple[AdapterLayer, dict[str, torch.Tensor]]],
                         list[tuple[torch.Tensor, torch.Tensor]]]:
    """The values for adapter `name`: per layer (file key suffix -> value, shaped to fit), and
    for the base tensors it trains (biases) as (live tensor, value)."""
    slot = adapter_tensors(model, name)
    unknown = sorted(set(weights) - set(slot))
    if unknown:
        raise AdapterError(
            f"key {unknown[0]!r} of the new weights matches no tensor of adapter {name!r}: the "
            "slot must adapt every module the new adapter does (attach it with target_modules "
            "covering both), and both must be made for this model")
    layer_values, covered = [], set()
    for path, layer in adapter_layers(model):
        prefix = layer.file_key_prefix(path)
        values = {}
        for suffix, target in layer.file_tensors(name).items():
            key = prefix + suffix
            covered.add(key)
            value = weights.get(key)
            if value is None and suffix not in RANK_DIM:
                raise AdapterError(f"the new weights lack {key!r}, which adapter {name!r} holds "
                                   "and which is not a LoRA factor that could stay zero")
            if value is None:
                value = torch.zeros_like(target)
            elif suffix in B_FACTORS and config is not None:
                value = value.float() * (config.scaling_for(path) / layer.scaling[name])
            values[suffix] = fit_rank(key, suffix, target, value)
        if values:
            layer_values.append((layer, values))
    base_values = []
    for key in slot.keys() - covered:
        if key not in weights:
            raise AdapterError(f"the new weights lack {key!r}, which adapter {name!r} trains")
        base_values.append((slot[key], fit_rank(key, "", slot[key], weights[key])))
    return layer_values, base_values


def fit_rank(key: str, suffix: str, target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` shaped like `target`: a LoRA factor of a lower rank padded with zeros."""
    if value.shape == target.shape:
        return value
    dim = RANK_DIM.get(suffix)
    other = [s for i, s in enumerate(target.shape) if i != dim]
    if dim is None or value.dim() != target.dim() or other != [
            s for i, s in enumerate(value.shape) if i != dim]:
        raise AdapterError(f"{key!r} has shape {tuple(value.shape)} but the slot holds "
                           f"{tuple(target.shape)}: the new adapter was made for another model")
    if value.shape[dim] > target.shape[dim]:
        raise AdapterError(
            f"{key!r} has rank {value.shape[dim]} but the slot's rank there is "
            f"{target.shape[dim]}: create the slot with the largest rank you will swap in "
            f"(LoRAConfig(rank={value.shape[dim]}) or more, or a rank_pattern)")
    padded = torch.zeros(target.shape, dtype=value.dtype, device=value.device)
    padded.narrow(dim, 0, value.shape[dim]).copy_(value)
    return padded

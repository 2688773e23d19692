"""Attaching a LoRA adapter whose init reads training data (EVA, LoRA-GA).

    batches = [{"input_ids": ..., "attention_mask": ..., "labels": ...}, ...]   # a few
    attach_with_data(model, LoRAConfig(init="eva", target_modules="all-linear"), batches)

The init's statistics are gathered on the model as it is (other adapters disabled), then the
adapter is attached and each layer takes its A, B (and, for LoRA-GA, its residual base). If the
init redistributes ranks (EVA), the adapter's config records them as a `rank_pattern` of full
module paths, so the saved file says which layer has which rank.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
from torch import nn

from splice.config.lora import LoRAConfig
from splice.core.attach import attach, base_of, delete_adapter, disable_adapters
from splice.core.errors import AdapterError
from splice.core.state import get_state, require_adapter
from splice.core.targets import iter_targets
from splice.inits.registry import get_init


def attach_with_data(model: nn.Module, config: LoRAConfig,
                     batches: Iterable[Mapping[str, torch.Tensor]], name: str = "default", *,
                     activate: bool = True) -> nn.Module:
    """Attach LoRA adapter `name` with a data-aware init computed from `batches` (mappings with
    input_ids, attention_mask and, for LoRA-GA, labels). A data-free init needs no batches and
    goes through plain `attach`. On any error the model is left as it was."""
    spec = get_init(config.init)
    if spec is None or not spec.needs_data:
        return attach(model, config, name, activate=activate)
    batches = list(batches)
    if not batches:
        raise AdapterError(f"init={config.init!r} needs at least one batch of training data")
    targets = {path: base_of(module) for path, module in iter_targets(model, config)}
    if not targets:
        raise AdapterError(f"target_modules={config.target_modules!r} matches no module")
    for path, module in targets.items():
        if not hasattr(module, "weight") or getattr(module.weight, "ndim", 0) != 2 or isinstance(
                module, nn.Embedding):
            raise AdapterError(f"init={config.init!r} applies to linear layers; {path} is a "
                               f"{type(module).__name__}: narrow target_modules")
    was_training = model.training
    quiet = disable_adapters(model) if get_state(model) is not None else contextlib.nullcontext()
    with quiet:
        stats = spec.collect(model, targets, batches, config)
    model.train(was_training)
    if spec.plan_ranks is not None:
        ranks = spec.plan_ranks(config, stats)
        pattern = {path: rank for path, rank in ranks.items() if rank != config.rank_for(path)}
        config = config.replace(rank_pattern={**config.rank_pattern, **pattern})
    attach(model, config.replace(init="default"), name, activate=activate)
    try:
        for path in targets:
            layer = model.get_submodule(path)
            rank = config.rank_for(path)
            layer.apply_init(name, spec.make(layer.init_weight(config.init), rank,
                                             layer.scaling[name], config.init_options, stats[path]))
    except BaseException:
        delete_adapter(model, name)
        raise
    require_adapter(model, name).config = config  # the record says how it started
    return model

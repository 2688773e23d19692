"""The mapping between an adapter's tensors in a model and the keys of peft's adapter files.

A file key is the model path of the tensor with the adapter name removed, under the prefix
`base_model.model.`: `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. A layer
may spell its keys otherwise (a model-level layer's carry no path: `prompt_embeddings`).
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn

from splice.core.errors import AdapterError
from splice.core.layer import FILE_PREFIX, AdapterLayer, adapter_layers
from splice.core.state import require_adapter
from splice.core.transaction import Transaction


def layer_file_tensors(model: nn.Module,
                       name: str) -> Iterator[tuple[str, AdapterLayer, str, torch.Tensor]]:
    """(file key, layer, key suffix within the layer, tensor) for each layer tensor of `name`."""
    for path, layer in adapter_layers(model):
        prefix = layer.file_key_prefix(path)
        for suffix, tensor in layer.file_tensors(name).items():
            yield prefix + suffix, layer, suffix, tensor


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Every tensor adapter `name` owns, by file key (the live parameters, not copies, except
    where a layer's file holds a tensor computed from them)."""
    entry = require_adapter(model, name)
    out = {key: tensor for key, _, _, tensor in layer_file_tensors(model, name)}
    params = dict(model.named_parameters())
    for param_name in entry.extra_trainable_names(model):
        out[FILE_PREFIX + param_name] = params[param_name]
    return out


def base_key_allowed(model: nn.Module, param_name: str, name: str) -> bool:
    """Base tensors an adapter file may carry: biases (peft's bias="all"/"lora_only") and the
    tables of embeddings the adapter targets (peft saves those alongside an embedding LoRA).
    Any other base weight in a file is refused rather than silently overwriting the model."""
    if param_name.endswith(".bias"):
        return True
    path, _, rest = param_name.rpartition(".base_layer.")
    if not path or rest != "weight":
        return False
    layer = model.get_submodule(path)
    return layer.has_adapter(name) and isinstance(layer.base_layer, nn.Embedding)


def load_adapter_weights(model: nn.Module, name: str, weights: Mapping[str, torch.Tensor],
                         tx: Transaction) -> None:
    """Copy file tensors into adapter `name`; every key and shape must fit (checked first)."""
    expected = adapter_tensors(model, name)
    base_params = {FILE_PREFIX + n: p for n, p in model.named_parameters() if base_key_allowed(model, n, name)}
    plan: list[tuple[torch.Tensor, str, torch.Tensor]] = []
    for key, value in weights.items():
        target = expected.get(key, base_params.get(key))
        if target is None:
            raise AdapterError(
                f"adapter file key {key!r} matches nothing in this model: the adapter was made for "
                "a different model (or other target modules); load it on the model it was trained on")
        if tuple(target.shape) != tuple(value.shape):
            raise AdapterError(
                f"adapter file key {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(target.shape)}: the adapter was trained on a different model size or rank")
        plan.append((target, key, value))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise AdapterError(f"adapter file lacks {len(missing)} tensor(s) the config implies, first "
                           f"{missing[0]!r}; the file is incomplete or its config does not match it")
    owners = {key: (layer, suffix) for key, layer, suffix, _ in layer_file_tensors(model, name)}
    by_layer: dict[int, tuple[AdapterLayer, dict[str, torch.Tensor]]] = {}
    for target, key, value in plan:
        if key in owners:  # the new adapter's own tensors: a rollback discards them anyway
            layer, suffix = owners[key]
            by_layer.setdefault(id(layer), (layer, {}))[1][suffix] = value
        else:
            tx.copy_into(target, value.to(target.dtype))
    for layer, values in by_layer.values():
        layer.load_file_tensors(name, values)

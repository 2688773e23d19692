"""Attach, activate, disable and delete named adapters on a model, atomically."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from splice.config.base import AdapterConfig
from splice.core.errors import AdapterError, TargetError
from splice.core.keys import load_adapter_weights
from splice.core.layer import AdapterLayer, ModelLevelLayer, adapter_layers
from splice.core.modules_to_save import ModulesToSaveLayer
from splice.core.registry import MethodSpec, method_for_config
from splice.core.state import (AdapterEntry, AdapterState, drop_state, get_state, require_adapter,
                               require_state)
from splice.core.targets import is_adapter_internal, iter_targets, matches_name, no_match_error
from splice.core.merging import merge_adapter, merged_adapter_names, unmerge_adapter
from splice.core.transaction import Transaction
from splice.quant.surgery import plan_quantization, quantizable_linears, rehome_kept_tensors

BASE_ADAPTER = "__base__"  # reserved: "no adapter" in per-row routing


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or name == BASE_ADAPTER:
        raise AdapterError(f"adapter name {name!r} is invalid: use letters, digits, '_' or '-' "
                           f"(no dots or path separators; {BASE_ADAPTER!r} is reserved)")
    if hasattr(nn.ModuleDict, name):
        # Adapters live in ModuleDicts keyed by name; a key that shadows a method cannot be set.
        raise AdapterError(f"adapter name {name!r} is the name of a torch module attribute; "
                           f"pick another (e.g. {name + '_adapter'!r})")


def attach(model: nn.Module, config: AdapterConfig, name: str = "default", *,
           activate: bool = True, weights: Mapping[str, torch.Tensor] | None = None,
           quantize: str | None = None) -> nn.Module:
    """Wrap every module `config` targets with adapter `name` and return the same model.

    With `weights` (keys as in peft's adapter files) the new adapter takes those values. With
    `quantize="nf4"` the base's linear layers (all but the output head) first become frozen 4-bit
    `Linear4bit` layers, so the adapter trains on a 4-bit base (QLoRA); layers already in 4 bits
    stay as they are. On any error the model is left exactly as it was. Afterwards only the
    active adapters' parameters (plus their modules_to_save copies and, when `config.bias` asks,
    biases) require grad.
    """
    check_adapter_name(name)
    spec = method_for_config(config)
    if spec.model_adapter is not None:
        config = spec.model_adapter.complete_config(model, config)
    state = get_state(model)
    if state is not None and name in state.adapters:
        raise AdapterError(f"the model already has an adapter named {name!r}; pick another name "
                           "or remove it first with splice.delete_adapter(model, name)")
    drop_layer_index(model)
    quantized = plan_base_quantization(model, quantize)
    if not quantized:
        targets = plan_targets(model, config, spec)
        saved = plan_saved_modules(model, config)
    with Transaction(model) as tx:
        if quantized:
            for path, layer in quantized:
                tx.swap_module(path, layer)
            rehome_kept_tensors(model)
            targets = plan_targets(model, config, spec)
            saved = plan_saved_modules(model, config)
        state = open_state(model, tx)
        tx.on_undo(lambda: drop_layer_index(model))  # runs last: the index may hold new layers
        if spec.model_adapter is not None:
            add_to_model(tx, model, spec.model_adapter, config, name)
        for path, module in targets:
            add_to_module(tx, path, module, spec.layer_class_for(base_of(module)), config, name)
        for path, module in saved:
            add_to_module(tx, path, module, ModulesToSaveLayer, config, name)
        state.adapters[name] = AdapterEntry(config, trainable_biases(model, config, name))
        tx.on_undo(lambda: state.adapters.pop(name, None))
        if weights is not None:
            load_adapter_weights(model, name, weights, tx)
        previous = list(state.active)
        tx.on_undo(lambda: set_layer_activity(model, previous))
        set_active_adapters(model, [name] if activate else previous)
        refresh_trainable(model)  # a full pass: the first attach freezes the base
    return model


QUANTIZATIONS = ("nf4",)


def plan_base_quantization(model: nn.Module, quantize: str | None) -> list[tuple[str, nn.Module]]:
    """The 4-bit layers to swap in before attaching (none without `quantize`)."""
    if quantize is None:
        return []
    if quantize not in QUANTIZATIONS:
        raise AdapterError(f"quantize={quantize!r} is not supported; choose one of "
                           f"{', '.join(QUANTIZATIONS)} (or None for a full-precision base)")
    if get_state(model) is None:
        return plan_quantization(model)
    if any(not is_adapter_internal(path) for path, _ in quantizable_linears(model)):
        raise AdapterError("the model already carries adapters on a full-precision base; quantize "
                           "when attaching the first adapter (or call splice.quant.quantize_model "
                           "before any attach)")
    return []


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, AdapterLayer) else module


def plan_targets(model: nn.Module, config: AdapterConfig,
                 spec: MethodSpec) -> list[tuple[str, nn.Module]]:
    """The modules to wrap, checked before anything changes."""
    if config.target_modules is None:
        return []
    targets = list(iter_targets(model, config))
    if not targets:
        raise no_match_error(model, config)
    for path, module in targets:
        layer_cls = spec.layer_class_for(base_of(module))
        if layer_cls is None:
            supported = ", ".join(sorted(t.__name__ for t in spec.layer_types))
            raise TargetError(f"{path} is a {type(base_of(module)).__name__}, which {spec.name} "
                              f"cannot wrap (it wraps {supported}); narrow target_modules")
        if isinstance(module, AdapterLayer) and not isinstance(module, layer_cls):
            raise TargetError(f"{path} already carries a {type(module).__name__} adapter; one "
                              "method per module: target other modules or delete that adapter")
    return targets


def plan_saved_modules(model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    if not config.modules_to_save:
        return []
    found = [(path, module) for path, module in model.named_modules()
             if matches_name(config.modules_to_save, path) and ".base_layer" not in path
             and "modules_to_save." not in path]
    if not found:
        raise TargetError(f"modules_to_save={list(config.modules_to_save)!r} matches no module; "
                          "give the name of a module in the model, e.g. 'lm_head' or 'score'")
    return found


def open_state(model: nn.Module, tx: Transaction) -> AdapterState:
    state = get_state(model)
    if state is None:
        state = get_state(model, create=True)
        state.base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        tx.on_undo(lambda: drop_state(model))
    return state


def add_to_module(tx: Transaction, path: str, module: nn.Module, layer_cls: type,
                  config: AdapterConfig, name: str) -> None:
    layer = module
    if not isinstance(module, AdapterLayer):
        layer = layer_cls(module)
        tx.swap_module(path, layer)
    layer.add_adapter(name, config, path)
    # New modules start in training mode; an adapter attached to a model in eval mode must not
    # run its dropout (its outputs would change from call to call).
    layer.train(module.training)
    tx.on_undo(lambda: layer.remove_adapter(name))


def add_to_model(tx: Transaction, model: nn.Module, layer_cls: type[ModelLevelLayer],
                 config: AdapterConfig, name: str) -> None:
    """Add adapter `name` to the model-level layer of its method, installing that layer first."""
    path = layer_cls.module_name
    layer = getattr(model, path, None)
    if layer is None:
        layer = layer_cls.install(model)
        tx.on_undo(lambda: layer.detach_from(model, path))
        layer.train(model.training)
    layer.add_adapter(name, config, path)
    tx.on_undo(lambda: layer.remove_adapter(name))


def trainable_biases(model: nn.Module, config: AdapterConfig, name: str) -> list[nn.Parameter]:
    """Base biases that train with this adapter (peft's `bias` option)."""
    mode = getattr(config, "bias", "none")
    if mode == "all":
        return [p for n, p in model.named_parameters()
                if n.endswith(".bias") and "lora_" not in n and "modules_to_save" not in n]
    if mode == "lora_only":
        return [layer.base_layer.bias for path, layer in adapter_layers(model)
                if layer.has_adapter(name) and getattr(layer.base_layer, "bias", None) is not None]
    return []


# Note: Switching in under a millisecond
# A model's module tree is large (SmolLM2 with 8 all-linear LoRA adapters: 6,300 modules and
# 3,700 parameters), and walking it costs ~0.2 s, far more than a switch should. So
# set_active_adapters (and per-row routing, core/routing.py) read a `LayerIndex`: the adapter
# layers with the adapters each holds, and each adapter's parameters, built on first use and
# kept on the model's adapter state. attach and delete_adapter, the only calls that add or
# remove adapter layers, drop it; merge_and_unload drops the state and the index with it. A
# switch then sets each layer's active list and flips requires_grad only for the adapters that
# leave or join the active set (and the base parameters they train): it relies on the flags
# being as the previous switch or attach's full `refresh_trainable` left them.


@dataclass
class LayerIndex:
    layers: list[tuple[str, AdapterLayer, frozenset[str]]]  # (path, layer, adapters it holds)
    params: dict[str, list[nn.Parameter]]  # adapter -> its parameters in every layer
    extra: dict[str, list[nn.Parameter]]   # adapter -> the base parameters it trains


def layer_index(model: nn.Module) -> LayerIndex:
    """The model's adapter layers and adapter parameters, built once per structure. See Note:
    Switching in under a millisecond."""
    state = require_state(model)
    index = state.layer_index
    if index is None:
        layers = [(path, layer, frozenset(layer.adapter_names))
                  for path, layer in adapter_layers(model)]
        params: dict[str, list[nn.Parameter]] = {name: [] for name in state.adapters}
        for _, layer, _ in layers:
            for name, found in layer.parameters_by_adapter().items():
                params.setdefault(name, []).extend(found)
        index = LayerIndex(
            layers,
            params,
            {name: list(entry.extra_trainable) for name, entry in state.adapters.items()})
        state.layer_index = index
    return index


def drop_layer_index(model: nn.Module) -> None:
    state = get_state(model)
    if state is not None:
        state.layer_index = None


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make `names` the adapters forward applies (their sum); only they train."""
    names = [names] if isinstance(names, str) else list(names)
    state = require_state(model)
    for name in names:
        require_adapter(model, name)
    index = layer_index(model)
    for path, layer, _ in index.layers:
        dropped = [n for n in layer.merged_adapters if n not in names]
        if dropped:
            raise AdapterError(f"adapter {dropped[0]!r} is merged into the base weights; call "
                               "splice.unmerge_adapter(model) before deactivating it")
    changed = set(state.active) ^ set(names)
    state.active = names
    for _, layer, held in index.layers:
        # object.__setattr__: a plain attribute, and Module.__setattr__ costs 2 µs a layer
        object.__setattr__(layer, "active_adapters", [n for n in names if n in held])
    for name in changed:
        flip_requires_grad(index.params[name], name in names)
    trained = {id(p) for name in names for p in index.extra[name]}
    for params in index.extra.values():
        for param in params:
            flip_requires_grad([param], id(param) in trained)


def flip_requires_grad(params: list[nn.Parameter], wanted: bool) -> None:
    for param in params:
        if param.requires_grad is not wanted:
            param.requires_grad_(wanted)


def set_layer_activity(model: nn.Module, names: list[str]) -> None:
    state = require_state(model)
    state.active = list(names)
    for _, layer in adapter_layers(model):
        layer.active_adapters = [n for n in names if layer.has_adapter(n)]
    refresh_trainable(model)


def refresh_trainable(model: nn.Module) -> None:
    """Freeze the base; let active adapters (and what they train in full) require grad."""
    state = require_state(model)
    extra = {id(p) for a in state.active for p in state.adapters[a].extra_trainable}
    for param in model.parameters():
        param.requires_grad_(id(param) in extra)
    active = set(state.active)
    for _, layer in adapter_layers(model):
        for name, params in layer.parameters_by_adapter().items():
            for param in params:
                param.requires_grad_(name in active)


def active_adapters(model: nn.Module) -> list[str]:
    state = get_state(model)
    return list(state.active) if state else []


def list_adapters(model: nn.Module) -> dict[str, AdapterConfig]:
    state = get_state(model)
    return {n: e.config for n, e in state.adapters.items()} if state else {}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """`with disable_adapters(model):` runs the exact base model; state is restored on exit.

    Adapters merged into the weights are unmerged for the block and merged back after it."""
    merged = merged_adapter_names(model)
    if merged:
        unmerge_adapter(model)
    layers = [layer for _, layer in adapter_layers(model)]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        if merged:
            merge_adapter(model, merged)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; modules left with no adapter are unwrapped back to the base."""
    require_adapter(model, name)
    state = require_state(model)
    drop_layer_index(model)
    for path, layer in list(adapter_layers(model)):
        if name in layer.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; call "
                               "splice.unmerge_adapter(model) before deleting it")
    for path, layer in list(adapter_layers(model)):
        if layer.has_adapter(name):
            layer.remove_adapter(name)
            if not layer.adapter_names:
                layer.detach_from(model, path)
    del state.adapters[name]
    state.active = [n for n in state.active if n != name]
    if state.adapters:
        set_layer_activity(model, state.active)
    else:
        restore_base_requires_grad(model, state)
        drop_state(model)


def restore_base_requires_grad(model: nn.Module, state: AdapterState) -> None:
    for param_name, param in model.named_parameters():
        param.requires_grad_(state.base_requires_grad.get(param_name, param.requires_grad))

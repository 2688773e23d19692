"""Compose LoRA adapters on a model into a new LoRA adapter, and adapter folders into a folder.

The math is `splice.merge.compose`, applied module by module. The new adapter is an ordinary
LoRA adapter (scaling 1: alpha = rank) that saves in peft's adapter format, loads anywhere and
merges. Only LoRA adapters compose: their update is the low-rank product s·B·A. A module that
some of the adapters do not adapt composes the ones that do: an absent adapter's update there is
zero, which is what Σ wᵢΔWᵢ means (it adds nothing, and it casts no vote in ties).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from splice.config.lora import LoRAConfig
from splice.core.attach import attach, check_adapter_name
from splice.core.errors import AdapterError, AdapterFileError
from splice.core.io import load_adapter, save_adapter
from splice.core.layer import AdapterLayer, adapter_layers
from splice.core.state import get_state, require_adapter
from splice.core.targets import iter_targets
from splice.merge.compose import Composed, LoRAUpdate, compose
from splice.merge.compose_config import CompositionConfig
from splice.models import load_model

#: file-key suffixes of a LoRA layer's factors (A, B): linear layers, then embeddings
FACTOR_KEYS = (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B"))
#: one module's sources: (weight, (A's key suffix, B's, the update)) per adapter it holds
Found = list[tuple[float, tuple[str, str, LoRAUpdate]]]


@dataclass(frozen=True)
class ModuleComposition:
    path: str
    rank: int
    error: float    # ‖ΔW − B·A‖_F / ‖ΔW‖_F of this module (0: exact)
    norm: float     # ‖ΔW‖_F of the composed update before truncation


@dataclass(frozen=True)
class CompositionReport:
    name: str                                   # the new adapter
    config: CompositionConfig
    modules: tuple[ModuleComposition, ...]
    output: Path | None = None                  # where it was saved, if it was

    @property
    def error(self) -> float:
        """The truncation error over all modules together: √Σ(errorₘ·normₘ)² / √Σ normₘ²."""
        total = sum(m.norm ** 2 for m in self.modules)
        lost = sum((m.error * m.norm) ** 2 for m in self.modules)
        return (lost / total) ** 0.5 if total > 0 else 0.0

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules), default=0.0)


def compose_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float],
                     method: str = "linear", *, density: float | None = None,
                     rank: int | None = None, new_name: str = "composed",
                     majority_sign: str = "total", seed: int = 0) -> CompositionReport:
    """Add LoRA adapter `new_name` = the composition of adapters `names` (see CompositionConfig).

    The new adapter is attached inactive (what forward computes does not change); activate it
    with `splice.set_active_adapters(model, new_name)`. Adapters may be named more than once
    (`compose_adapters(model, ["a", "a"], [1, -1])` is zero)."""
    config = CompositionConfig(tuple(weights), method, density, rank, majority_sign, seed)
    names = list(names)
    check_sources(model, names, config, new_name)
    sources = lora_sources(model, names, config.weights)
    rank = config.rank
    if rank is None and config.method not in ("linear", "cat"):
        # One rank for the whole adapter: the largest input rank on any module.
        rank = max(f[2].rank for _, found in sources.values() for _, f in found)
    # One generator for the whole model: the draws follow module order, then adapter order.
    generator = torch.Generator().manual_seed(config.seed)
    results: dict[str, Composed] = {}
    file_weights: dict[str, torch.Tensor] = {}
    for path, (layer, found) in sources.items():
        composed = compose([f[2] for _, f in found], [w for w, _ in found], config.method,
                           density=config.density, rank=rank,
                           majority_sign=config.majority_sign, generator=generator)
        a_key, b_key, _ = found[0][1]
        prefix = layer.file_key_prefix(path)
        file_weights[prefix + a_key], file_weights[prefix + b_key] = composed.a, composed.b
        results[path] = composed
    attach(model, composed_lora_config(model, {p: c.rank for p, c in results.items()}), new_name,
           activate=False, weights=file_weights)
    modules = tuple(ModuleComposition(p, c.rank, c.error, c.norm) for p, c in results.items())
    return CompositionReport(new_name, config, modules)


def lora_sources(model: nn.Module, names: list[str],
                 weights: Sequence[float]) -> dict[str, tuple[AdapterLayer, Found]]:
    """Per module path: the layer and (weight, lora_factors) of each named adapter it holds."""
    sources = {}
    for path, layer in adapter_layers(model):
        found = [(w, lora_factors(layer, n)) for n, w in zip(names, weights)]
        found = [(w, f) for w, f in found if f is not None]
        if found:
            sources[path] = (layer, found)
    return sources


def check_sources(model: nn.Module, names: list[str], config: CompositionConfig,
                  new_name: str) -> None:
    """Refuse what does not compose, before any work: the message names the adapter and why."""
    if len(names) != len(config.weights):
        raise AdapterError(f"{len(names)} adapter(s) but {len(config.weights)} weight(s): give one "
                           "weight per adapter, in the same order")
    check_adapter_name(new_name)
    state = get_state(model)
    if state is not None and new_name in state.adapters:
        raise AdapterError(f"the model already has an adapter named {new_name!r}; choose another "
                           "name for the composition")
    for name in names:
        adapter = require_adapter(model, name)
        if adapter.config.method != "lora":
            raise AdapterError(
                f"adapter {name!r} is a {adapter.config.method} adapter; only LoRA adapters "
                "compose (their update is a low-rank product s·B·A). Merge it into the base "
                "instead (splice.merge_adapter)")
        if adapter.config.modules_to_save or adapter.extra_trainable:
            raise AdapterError(
                f"adapter {name!r} also trains full tensors (modules_to_save or biases), which a "
                "LoRA composition cannot hold; compose adapters trained with bias='none' and no "
                "modules_to_save")


def lora_factors(layer: AdapterLayer, name: str) -> tuple[str, str, LoRAUpdate] | None:
    """(A's file-key suffix, B's, the update) of LoRA adapter `name` on this layer, or None."""
    tensors = layer.file_tensors(name)
    for a_key, b_key in FACTOR_KEYS:
        if a_key in tensors and b_key in tensors:
            update = LoRAUpdate(tensors[a_key].detach(), tensors[b_key].detach(),
                                layer.scaling[name])
            return a_key, b_key, update
    return None


def composed_lora_config(model: nn.Module, ranks: dict[str, int]) -> LoRAConfig:
    """A LoRA config that adapts exactly the modules in `ranks`, each at its rank, scaling 1.

    The most common rank is the config's; the others go to rank_pattern (alpha_pattern keeps
    alpha = rank, so the scaling stays 1), keyed by the escaped module path."""
    rank = Counter(ranks.values()).most_common(1)[0][0]
    others = {re.escape(p): r for p, r in ranks.items() if r != rank}
    return LoRAConfig(target_modules=target_names(model, set(ranks)), rank=rank, alpha=rank,
                      rank_pattern=others, alpha_pattern=dict(others))


def target_names(model: nn.Module, paths: set[str]) -> tuple[str, ...]:
    """The modules' last names when those select exactly `paths` (the readable form a config
    file usually holds), else the full paths."""
    short = tuple(sorted({p.rsplit(".", 1)[-1] for p in paths}))
    selected = {p for p, _ in iter_targets(model, LoRAConfig(target_modules=short))}
    return short if selected == paths else tuple(sorted(paths))


def compose_folders(model_name: str | os.PathLike, adapter_folders: Sequence[str | os.PathLike],
                    output: str | os.PathLike, config: CompositionConfig) -> CompositionReport:
    """Load the model and each adapter folder, compose them and save the result to `output`."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise AdapterFileError(f"{output} exists and is not an empty folder; choose a new "
                               "--output folder (an existing adapter is never overwritten)")
    model, _ = load_model(model_name)
    names = [f"input_{i}" for i in range(len(adapter_folders))]
    for name, folder in zip(names, adapter_folders):
        load_adapter(model, folder, name, activate=False)
    report = compose_adapters(model, names, config.weights, config.method, density=config.density,
                              rank=config.rank, majority_sign=config.majority_sign,
                              seed=config.seed)
    save_adapter(model, output, report.name)
    return CompositionReport(report.name, report.config, report.modules, output)

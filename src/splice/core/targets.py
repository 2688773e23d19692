"""Which modules of a model an adapter config selects.

The rules are peft's, so a config means the same in both: a list entry matches a module whose
dotted path equals it or ends with '.entry'; a string is a regex that must match the whole path;
'all-linear' is every linear layer (4-bit ones included) except the output head.
"""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from splice.config.base import AdapterConfig
from splice.core.errors import TargetError
from splice.core.layer import AdapterLayer
from splice.quant.linear4bit import Linear4bit

try:  # GPT-2 style models store linear weights transposed in a Conv1D.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a runtime dependency
    Conv1D = ()

# A frozen NF4 layer is still a linear layer to 'all-linear' (QLoRA adapts the 4-bit base).
LINEAR_TYPES = (nn.Linear, Linear4bit) + ((Conv1D,) if Conv1D else ())


def matches_name(target: tuple[str, ...] | str, path: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, path) is not None
    return any(path == t or path.endswith("." + t) for t in target)


def layer_index(path: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    """The first numbered segment after a layer-list name ('model.layers.3.mlp' -> 3)."""
    patterns = layers_pattern or (r"[^.]*",)
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", path)
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the module that produces the logits (excluded by 'all-linear')."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return {path for path, module in model.named_modules() if head is not None and module is head}


def linear_module_names(model: nn.Module) -> list[str]:
    return [path for path, module in model.named_modules() if isinstance(module, LINEAR_TYPES)]


def is_selected(config: AdapterConfig, path: str, module: nn.Module, heads: set[str]) -> bool:
    target = config.target_modules
    if target == "all-linear":
        if not isinstance(module, LINEAR_TYPES) or path in heads:
            return False
    elif target is None or not matches_name(target, path):
        return False
    if config.layers_to_transform is not None:
        return layer_index(path, config.layers_pattern) in config.layers_to_transform
    return True


def iter_targets(model: nn.Module, config: AdapterConfig) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for every module the config selects, skipping adapter internals."""
    heads = output_head_names(model) | {f"{h}.base_layer" for h in output_head_names(model)}
    saved = config.modules_to_save or ()
    for path, module in model.named_modules():
        if is_adapter_internal(path) or (saved and matches_name(saved, path)):
            continue
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        if is_selected(config, path, base, heads):
            yield path, module


def is_adapter_internal(path: str) -> bool:
    """Modules created by splice inside a wrapper (its adapters, its saved copies)."""
    parts = path.split(".")
    return any(p == "base_layer" or p.startswith(("lora_", "ia3_", "modules_to_save", "adapter_"))
               for p in parts)


def no_match_error(model: nn.Module, config: AdapterConfig) -> TargetError:
    names = linear_module_names(model)
    kinds = sorted({p.rsplit(".", 1)[-1] for p in names})
    return TargetError(
        f"target_modules={config.target_modules!r} matches no module this method can wrap. "
        f"The model's linear layers are named: {', '.join(kinds) or '(none)'} "
        f"(e.g. {names[0] if names else 'n/a'}); pass some of these names, a regex, or 'all-linear'.")

"""Counting what trains: the numbers behind "LoRA trains 0.1% of the weights"."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from splice.core.layer import adapter_layers


@dataclass(frozen=True)
class TrainableCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f}")


def count_trainable(model: nn.Module) -> TrainableCount:
    """Trainable and total parameters; a tied tensor counts once. A quantized layer holds its
    frozen weight packed in buffers and says how many parameters those stand for
    (`packed_param_count`); they count in the total."""
    params = list(model.parameters())
    packed = sum(getattr(m, "packed_param_count", 0) for m in model.modules())
    return TrainableCount(sum(p.numel() for p in params if p.requires_grad),
                          sum(p.numel() for p in params) + packed)


def adapter_parameters_by_module_type(model: nn.Module, name: str) -> dict[str, int]:
    """Parameters adapter `name` adds, grouped by module type (the last path segment)."""
    counts: dict[str, int] = defaultdict(int)
    for path, layer in adapter_layers(model):
        kind = path.rsplit(".", 1)[-1]
        counts[kind] += sum(p.numel() for _, p in layer.adapter_parameters(name))
    return dict(counts)


def base_parameters_by_module_type(model: nn.Module, name: str) -> dict[str, int]:
    """Base weights of the modules adapter `name` wraps, grouped like the adapter counts."""
    counts: dict[str, int] = defaultdict(int)
    for path, layer in adapter_layers(model):
        if layer.has_adapter(name):
            counts[path.rsplit(".", 1)[-1]] += sum(p.numel() for p in layer.base_layer.parameters())
    return dict(counts)


"""Modules trained in full alongside an adapter (`modules_to_save`), e.g. a new classifier head.

Each adapter gets its own trainable copy; the original stays untouched as `base_layer`, so
disabling or switching adapters gives back the original module exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from splice.config.base import AdapterConfig
from splice.core.layer import AdapterLayer


class ModulesToSaveLayer(AdapterLayer):
    """Routes forward to the first active adapter's copy of the module, else to the original."""

    adapter_prefixes = ("modules_to_save",)
    file_prefixes = {"modules_to_save": ""}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.modules_to_save = nn.ModuleDict()

    def add_adapter(self, name: str, config: AdapterConfig, module_path: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)

    def fold_into(self, weight: torch.Tensor, name: str, sign: int) -> torch.Tensor:
        raise NotImplementedError("a module saved in full is swapped in, not merged")

    def forward(self, *args, **kwargs):
        for name in self.adapters_to_apply():
            return self.modules_to_save[name](*args, **kwargs)
        return self.base_layer(*args, **kwargs)

    def __getattr__(self, name: str):
        # Callers read attributes such as `.weight` or `.out_features` off a head; answer from the
        # module that forward would use so the wrapper is transparent.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current_module(), name)

    def current_module(self) -> nn.Module:
        for name in self.adapters_to_apply():
            return self.modules_to_save[name]
        return self.base_layer

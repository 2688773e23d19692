"""What an adapter config would train on a model, counted on real attached parameters."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from splice.config.base import AdapterConfig
from splice.core.accounting import adapter_parameters_by_module_type, base_parameters_by_module_type
from splice.core.attach import attach, delete_adapter
from splice.core.layer import adapter_layers


@dataclass(frozen=True)
class ModuleTypeCount:
    module_type: str
    modules: int
    adapter_params: int
    base_params: int


@dataclass(frozen=True)
class ParameterReport:
    """What an adapter config would train on a model, per module type and in total."""

    rows: tuple[ModuleTypeCount, ...]
    model_params: int

    @property
    def adapter_params(self) -> int:
        return sum(r.adapter_params for r in self.rows)

    @property
    def percent(self) -> float:
        return 100.0 * self.adapter_params / self.model_params if self.model_params else 0.0


REPORT_ADAPTER = "splice_parameter_report"


def parameter_report(model: nn.Module, config: AdapterConfig) -> ParameterReport:
    """Attach `config` under a scratch name, count, and remove it again (the model is unchanged).

    Counting real attached parameters, not a formula, keeps the numbers true for every method,
    rank pattern and module kind."""
    total = sum(p.numel() for p in model.parameters())
    attach(model, config, REPORT_ADAPTER, activate=False)
    try:
        adapter = adapter_parameters_by_module_type(model, REPORT_ADAPTER)
        base = base_parameters_by_module_type(model, REPORT_ADAPTER)
        modules: dict[str, int] = defaultdict(int)
        for path, layer in adapter_layers(model):
            if layer.has_adapter(REPORT_ADAPTER):
                modules[path.rsplit(".", 1)[-1]] += 1
    finally:
        delete_adapter(model, REPORT_ADAPTER)
    rows = tuple(ModuleTypeCount(k, modules[k], adapter[k], base[k]) for k in modules)
    return ParameterReport(rows, total)

"""The method registry: each PEFT method declares itself here from its own module.

A method registers its config class and peft type with `register_method`, and each of its layer
classes with `@implements(method, BaseModuleType, ...)`. Generic code looks methods up here and
never names one, so adding a method touches only its own file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from splice.config.base import AdapterConfig


@dataclass
class MethodSpec:
    """What the rest of splice needs to know about one PEFT method."""

    name: str
    config_cls: type[AdapterConfig]
    trains: str
    mergeable: bool
    why_not_mergeable: str = ""
    peft_type: str | None = None
    #: whose format the adapter folder follows: "peft" (peft and servers built on it load it)
    #: or "splice" (same folder layout, a peft_type only splice knows)
    file_format: str = "peft"
    matches_peft: Callable[[Mapping[str, Any]], bool] | None = None
    layer_types: dict[type, type] = field(default_factory=dict)
    #: a ModelLevelLayer class, for a method that changes the model's input instead of wrapping
    #: modules (attach installs one on the model and adds each adapter to it)
    model_adapter: type | None = None

    def layer_class_for(self, module: nn.Module) -> type | None:
        """The wrapper class for a base module, by exact type first, then by subclass."""
        if type(module) in self.layer_types:
            return self.layer_types[type(module)]
        for base_type, layer_cls in self.layer_types.items():
            if isinstance(module, base_type):
                return layer_cls
        return None


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def implements(method: str, *base_types: type) -> Callable[[type], type]:
    """Class decorator: this adapter layer wraps modules of these base types for `method`."""
    def decorate(layer_cls: type) -> type:
        for base_type in base_types:
            METHODS[method].layer_types[base_type] = layer_cls
        return layer_cls
    return decorate


def get_method(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}") from None


def method_for_config(config: AdapterConfig) -> MethodSpec:
    return get_method(config.method)


def method_for_peft_config(data: Mapping[str, Any]) -> MethodSpec:
    """The method whose file format an adapter_config.json dict is written in."""
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError("adapter_config.json has no 'peft_type'; it is not a peft-format adapter")
    for spec in METHODS.values():
        if spec.peft_type == peft_type and (spec.matches_peft is None or spec.matches_peft(data)):
            return spec
    known = sorted({s.peft_type for s in METHODS.values() if s.peft_type})
    raise ValueError(f"adapter_config.json: peft_type {peft_type!r} is not supported by splice; "
                     f"supported: {', '.join(known)}")


def method_table() -> list[dict[str, str]]:
    """One row per registered method: what it trains and whether it merges into the base."""
    return [{"method": spec.name, "trains": spec.trains,
             "mergeable": "yes" if spec.mergeable else f"no: {spec.why_not_mergeable}",
             "file format": f"{spec.file_format} ({spec.peft_type})" if spec.peft_type else "splice"}
            for spec in METHODS.values()]

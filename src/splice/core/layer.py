"""The adapter-layer protocol every method's layer satisfies.

An `AdapterLayer` wraps one base module (`base_layer`) and holds any number of named adapters in
ModuleDicts / ParameterDicts whose attribute names carry the method prefix (`lora_A`, `ia3_l`).
The state-dict key of an adapter tensor is therefore `<prefix>.<adapter name>[.<rest>]`, and the
peft file key is the same with the adapter name removed. Generic code (attach, merge, save) uses
only this protocol and never names a method.

A `ModelLevelLayer` is the same protocol for a method that wraps no module but changes the
model's input (virtual tokens, a key/value prefix): it sits on the model itself.
"""

from __future__ import annotations

from typing import ClassVar, Iterator, Mapping

import torch
from torch import nn

from splice.config.base import AdapterConfig
from splice.core.transaction import parent_of

FILE_PREFIX = "base_model.model."


class AdapterLayer(nn.Module):
    """A base module plus named adapters; subclasses define the adapters' math."""

    #: attributes (ModuleDict / ParameterDict) holding per-adapter state, keyed by adapter name
    adapter_prefixes: ClassVar[tuple[str, ...]] = ()
    #: how a prefix is spelled in peft's file keys, where it differs ('' drops it)
    file_prefixes: ClassVar[dict[str, str]] = {}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # -- what a method implements ---------------------------------------------------------------
    def add_adapter(self, name: str, config: AdapterConfig, module_path: str) -> None:
        """Create the parameters of adapter `name` for this module, initialised."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter `name` in the base weight's layout (mergeable methods only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be merged into the base weight")

    def fold_into(self, weight: torch.Tensor, name: str, sign: int) -> torch.Tensor:
        """The base weight with adapter `name` merged in (sign=+1) or taken out (sign=-1).

        Additive methods add ±ΔW; a method whose merge is not additive overrides this."""
        delta = self.delta_weight(name).to(torch.float32)
        return (weight.to(torch.float32) + sign * delta).to(weight.dtype)

    def fold_bias_into(self, bias: torch.Tensor, name: str, sign: int) -> torch.Tensor:
        """The base bias with adapter `name` merged in or taken out; unchanged by default (a
        method whose adapter acts on the bias, such as an output scaling, overrides this)."""
        return bias

    # -- generic behaviour ----------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        for prefix in self.adapter_prefixes:
            container = getattr(self, prefix, None)
            if container is not None and len(container):
                return list(container.keys())
        return []

    def has_adapter(self, name: str) -> bool:
        return name in self.adapter_names

    def adapters_to_apply(self) -> list[str]:
        """Active adapters that forward must add on top of the base (merged ones are inside it)."""
        if self.disabled:
            return []
        return [n for n in self.active_adapters
                if n not in self.merged_adapters and self.has_adapter(n)]

    def remove_adapter(self, name: str) -> None:
        for prefix in self.adapter_prefixes:
            container = getattr(self, prefix)
            if name in container:
                del container[name]
        self.forget_adapter(name)
        self.active_adapters = [n for n in self.active_adapters if n != name]

    def forget_adapter(self, name: str) -> None:
        """Drop per-adapter plain attributes (scalings and the like); override when there are any."""

    def adapter_parameters(self, name: str) -> Iterator[tuple[str, nn.Parameter]]:
        """(state-dict key within this layer, parameter) for adapter `name`."""
        for key, param in self.named_parameters():
            prefix, _, rest = key.partition(".")
            if prefix in self.adapter_prefixes and (rest == name or rest.startswith(name + ".")):
                yield key, param

    def parameters_by_adapter(self) -> dict[str, list[nn.Parameter]]:
        """Every adapter's parameters in one walk over the layer (adapter names hold no dots).
        Asking `adapter_parameters` once per adapter walks the layer once per adapter, which
        made an attach cost grow with the square of the adapters held."""
        found: dict[str, list[nn.Parameter]] = {}
        for key, param in self.named_parameters():
            prefix, _, rest = key.partition(".")
            if prefix in self.adapter_prefixes and rest:
                found.setdefault(rest.split(".", 1)[0], []).append(param)
        return found

    def file_key(self, key: str, name: str) -> str:
        """The peft file key suffix of a state-dict key: the adapter name removed."""
        prefix, _, rest = key.partition(".")
        rest = rest[len(name):].lstrip(".")
        prefix = self.file_prefixes.get(prefix, prefix)
        return ".".join(p for p in (prefix, rest) if p)

    def file_key_prefix(self, path: str) -> str:
        """What comes before a `file_key` in the file: this layer's model path."""
        return f"{FILE_PREFIX}{path}."

    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter `name`'s tensors as its file holds them, by file key suffix (live parameters)."""
        return {self.file_key(key, name): param for key, param in self.adapter_parameters(name)}

    @torch.no_grad()
    def load_file_tensors(self, name: str, values: Mapping[str, torch.Tensor]) -> None:
        """Take file values (keyed and shaped like `file_tensors`, checked) into adapter `name`."""
        tensors = self.file_tensors(name)
        for key, value in values.items():
            tensors[key].copy_(value.to(tensors[key].dtype))

    def detach_from(self, model: nn.Module, path: str, replacement: nn.Module | None = None) -> None:
        """Leave the model: `replacement` (default: the base module) takes this layer's place."""
        parent, attr = parent_of(model, path)
        setattr(parent, attr, self.base_layer if replacement is None else replacement)

    def base_weight(self) -> nn.Parameter:
        return self.base_layer.weight

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}"


class ModelLevelLayer(AdapterLayer):
    """An adapter layer that wraps no module: it changes the model's input (through hooks it
    installs) and lives on the model as `model.<module_name>`, one per method. attach puts it
    there on the method's first adapter (`MethodSpec.model_adapter`); `detach_from` removes it
    and its hooks. Its file keys carry no module path."""

    #: the attribute of the model that holds it; 'adapter_' keeps target matching out of it
    module_name: ClassVar[str] = ""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        # The module whose input it changes is referenced, not owned: as a registered child it
        # would appear a second time in the model's state dict and module list.
        del self._modules["base_layer"]
        self.__dict__["base_layer"] = base_layer

    @classmethod
    def complete_config(cls, model: nn.Module, config: AdapterConfig) -> AdapterConfig:
        """The config with what it derives from the model filled in (checked where given)."""
        return config

    @classmethod
    def install(cls, model: nn.Module) -> "ModelLevelLayer":
        """Create the layer, set it as `model.<module_name>` and hook it into the forward."""
        raise NotImplementedError

    def remove_hooks(self) -> None:
        """Undo what `install` hooked into the forward."""
        raise NotImplementedError

    def detach_from(self, model: nn.Module, path: str, replacement: nn.Module | None = None) -> None:
        self.remove_hooks()
        parent, attr = parent_of(model, path)
        delattr(parent, attr)

    def file_key_prefix(self, path: str) -> str:
        return ""


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield path, module

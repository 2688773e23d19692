"""What splice remembers about the adapters attached to one model.

The record lives on the model object itself (`model.splice_adapters`), so a model can be passed
around (to a trainer, to save_adapter) without a wrapper class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from splice.config.base import AdapterConfig
from splice.core.errors import AdapterError

STATE_ATTR = "splice_adapters"


@dataclass
class AdapterEntry:
    config: AdapterConfig
    #: base parameters (e.g. biases with bias="all") that train and save with this adapter.
    #: Kept as the tensors, not their names: a later attach that wraps their module renames them
    #: (`q_proj.bias` -> `q_proj.base_layer.bias`). `extra_trainable_names` gives the names now.
    extra_trainable: list[nn.Parameter] = field(default_factory=list)

    def extra_trainable_names(self, model: nn.Module) -> list[str]:
        held = {id(p) for p in self.extra_trainable}
        return [n for n, p in model.named_parameters() if id(p) in held]


@dataclass
class AdapterState:
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    #: requires_grad of every base parameter before the first attach, restored when the last goes
    base_requires_grad: dict[str, bool] = field(default_factory=dict)
    #: the adapter layers and parameters, indexed for fast switching (attach.layer_index);
    #: None until first needed, dropped whenever the structure changes
    layer_index: Any = field(default=None, repr=False, compare=False)


def get_state(model: nn.Module, create: bool = False) -> AdapterState | None:
    state = model.__dict__.get(STATE_ATTR)
    if state is None and create:
        state = AdapterState()
        model.__dict__[STATE_ATTR] = state
    return state


def require_state(model: nn.Module) -> AdapterState:
    state = get_state(model)
    if state is None or not state.adapters:
        raise AdapterError("this model has no splice adapters; attach one with splice.attach(model, "
                           "config) or load one with splice.load_adapter(model, folder)")
    return state


def require_adapter(model: nn.Module, name: str) -> AdapterEntry:
    state = require_state(model)
    if name not in state.adapters:
        raise AdapterError(f"no adapter named {name!r} on this model; attached: "
                           f"{', '.join(state.adapters)}")
    return state.adapters[name]


def drop_state(model: nn.Module) -> None:
    model.__dict__.pop(STATE_ATTR, None)

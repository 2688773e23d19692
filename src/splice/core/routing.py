"""Per-row adapter routing: one forward in which row i of the batch uses adapter names[i].

    with splice.adapter_routing(model, ["math", "__base__", "chat", "math"]):
        logits = model(input_ids).logits            # or model.generate(input_ids, ...)

`"__base__"` (BASE_ADAPTER) runs a row on the base model alone. The routing belongs to the call,
not to the model: it lives in a context variable, so concurrent requests (threads, asyncio tasks)
each see their own, and the model's active adapters (`set_active_adapters`) stay as they were.
Inside the block every adapter layer of the model follows the routing, not the active set.

A layer class takes part by registering with `@routable`; its forward asks `route_for(self)` and,
given a `Route`, computes each row with that row's adapter (for LoRA: batched gathers over stacked
adapter weights, methods/lora_batched.py). A layer that cannot route refuses up front: entering
the block fails when a routed adapter lives on such a layer, or when one of its active adapters
would otherwise apply to every row.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from splice.core.attach import BASE_ADAPTER, layer_index
from splice.core.errors import AdapterError
from splice.core.layer import AdapterLayer
from splice.core.state import require_adapter

#: layer classes whose forward honours a Route (exact types: a subclass changes the math)
ROUTABLE: set[type] = set()


def routable(cls: type[AdapterLayer]) -> type[AdapterLayer]:
    """Class decorator: `cls.forward` computes per-row adapters when `route_for(self)` is set."""
    ROUTABLE.add(cls)
    return cls


class Route:
    """The adapter of each row for one routed call, and per-layer slot indices derived from it."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._slots: dict[tuple, torch.Tensor] = {}

    def slots(self, order: tuple[str, ...], device: torch.device) -> torch.Tensor | None:
        """(rows,) int64: each row's position in `order` (a layer's stacked adapters), or
        len(order), the layer's zero slot, for "__base__" and for adapters the layer does not
        hold. None when every row gets the zero slot (the layer's output is its base's)."""
        key = (order, device)
        if key not in self._slots:
            position = {name: i for i, name in enumerate(order)}
            slots = [position.get(name, len(order)) for name in self.names]
            self._slots[key] = (None if all(s == len(order) for s in slots)
                                else torch.tensor(slots, dtype=torch.long, device=device))
        return self._slots[key]

    def rows_per_name(self, rows: int) -> int:
        """How many consecutive rows of a layer's input each name covers (see `adapter_routing`)."""
        if rows % len(self.names):
            raise AdapterError(
                f"the routing names {len(self.names)} adapter(s) but a layer received "
                f"{rows} rows: give one adapter name per row of the batch")
        return rows // len(self.names)


# Layer id -> Route, for the layers of every model routed in the current context.
_ROUTES: contextvars.ContextVar[dict[int, Route]] = contextvars.ContextVar("splice_routes",
                                                                          default={})
# How many routing blocks are open, in any thread. Forward reads this plain global first:
# torch.compile cannot trace ContextVar.get, and a compiled model outside routing never calls it
# (inside a block a compiled model recompiles once and breaks its graph at each adapter layer).
_OPEN = 0
_OPEN_LOCK = threading.Lock()


def route_for(layer: nn.Module) -> Route | None:
    """The routing of `layer` in the current call, or None (forward as usual)."""
    if not _OPEN:
        return None
    return _ROUTES.get().get(id(layer))


def check_routable(model: nn.Module, names: tuple[str, ...]) -> list[AdapterLayer]:
    """The model's routable layers; raise if some layer would not follow the routing."""
    routed = set(names) - {BASE_ADAPTER}
    layers = []
    for path, layer, held in layer_index(model).layers:
        if layer.merged_adapters:
            raise AdapterError(f"adapter {layer.merged_adapters[0]!r} is merged into the base "
                               "weights, so every row would get it; call "
                               "splice.unmerge_adapter(model) before routing rows")
        if type(layer) in ROUTABLE:
            layers.append(layer)
            continue
        kind = type(layer).__name__
        if routed & held:
            raise AdapterError(
                f"adapter {sorted(routed & held)[0]!r} has a {kind} at {path}, which cannot route "
                "rows to different adapters; run the rows of that adapter in their own batch")
        if layer.adapters_to_apply():
            raise AdapterError(
                f"adapter {layer.adapters_to_apply()[0]!r} is active on {path} ({kind}, which "
                "cannot route rows) and would apply to every row; deactivate it first with "
                "splice.set_active_adapters(model, [...])")
    return layers


@contextlib.contextmanager
def adapter_routing(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """`with adapter_routing(model, names):` every forward of `model` in the block runs row i
    with adapter `names[i]` (or the base for "__base__"); the active adapters are untouched.

    A layer whose input has k·len(names) rows gives each name k consecutive rows: that is how
    `generate` expands a batch for beam search or several sequences per prompt, and how a
    (batch·tokens, features) input is laid out, so both route correctly.
    """
    if isinstance(adapter_names, str) or not len(adapter_names):
        raise AdapterError("adapter_names must be a non-empty list with one adapter name per row "
                           f"(use {BASE_ADAPTER!r} for a row on the base model)")
    names = tuple(adapter_names)
    for name in set(names) - {BASE_ADAPTER}:
        require_adapter(model, name)
    route = Route(names)
    routes = dict(_ROUTES.get())
    routes.update({id(layer): route for layer in check_routable(model, names)})
    token = _ROUTES.set(routes)
    _count_open(+1)
    try:
        yield model
    finally:
        _count_open(-1)
        _ROUTES.reset(token)


def _count_open(step: int) -> None:
    global _OPEN
    with _OPEN_LOCK:
        _OPEN += step


def forward_mixed(model: nn.Module, input_ids: torch.Tensor, adapter_names: Sequence[str],
                  **kwargs: Any) -> Any:
    """`model(input_ids, **kwargs)` with row i on adapter `adapter_names[i]` (adapter_routing)."""
    with adapter_routing(model, adapter_names):
        return model(input_ids, **kwargs)

"""Choosing an optimizer by name: the one switch `splice train --optimizer` needs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from splice.optim.adamw8bit import AdamW8bit
from splice.optim.paged import PagedAdamW
from splice.optim.update import OptimizerError

_BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "paged_adamw": PagedAdamW,
    "adamw8bit": AdamW8bit,
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(_BUILDERS)
"""adamw: torch's AdamW; paged_adamw: AdamW with host-memory state paged per parameter;
adamw8bit: AdamW with blockwise 8-bit moments (2 bytes of state per parameter instead of 8)."""


def make_optimizer(name: str, params: Iterable[Any], lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """The optimizer called ``name`` over ``params`` (tensors or parameter-group dicts)."""
    if name not in _BUILDERS:
        raise OptimizerError(f"unknown optimizer {name!r}: choose one of "
                             f"{', '.join(OPTIMIZER_NAMES)}")
    return _BUILDERS[name](params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)

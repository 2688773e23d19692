"""The table of LoRA initialisations by name; see splice.inits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from splice.config.base import ConfigError


@dataclass(frozen=True)
class LowRankInit:
    a: torch.Tensor                  # (r, in)
    b: torch.Tensor                  # (out, r)
    base: torch.Tensor | None = None  # (out, in): the new base weight, or None to keep it
    #: True when base = W - s·B·A exactly, so the untouched base plus s·(B·A - B₀·A₀) is the
    #: trained model (the adapter can be saved for the original base); False for a base that
    #: differs from W otherwise (a quantized one)
    residual: bool = False


@dataclass(frozen=True)
class InitSpec:
    name: str
    #: (weight (out, in) fp32, rank, scaling, options[, statistics]) -> LowRankInit
    make: Callable[..., LowRankInit]
    #: what it does, for docs and errors
    summary: str
    #: (model, {module path: base module}, batches, config) -> {module path: statistics};
    #: None for a data-free init
    collect: Callable[..., dict[str, Any]] | None = None
    #: (config, {module path: statistics}) -> {module path: rank}: an init that redistributes
    #: ranks across layers (EVA); None keeps the config's ranks
    plan_ranks: Callable[..., dict[str, int]] | None = None

    @property
    def needs_data(self) -> bool:
        return self.collect is not None


INITS: dict[str, InitSpec] = {}


def register_init(spec: InitSpec) -> InitSpec:
    if spec.name in INITS:
        raise ValueError(f"init {spec.name!r} is already registered")
    INITS[spec.name] = spec
    return spec


def get_init(name: str) -> InitSpec | None:
    """The registered init of that name; None for the built-in 'default' and 'gaussian'."""
    if name in ("default", "gaussian"):
        return None
    try:
        return INITS[name]
    except KeyError:
        raise ConfigError(f"unknown init {name!r}; known: default, gaussian, "
                          f"{', '.join(sorted(INITS))}") from None


def residual_of(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> LowRankInit:
    """A, B and the base W - s·B·A that keeps the model's output unchanged."""
    return LowRankInit(a=a.contiguous(), b=b.contiguous(),
                       base=weight - scaling * (b @ a), residual=True)  # (out, in)


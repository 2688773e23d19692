"""How to compose LoRA adapters into one: the method, the weights and the method's options."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from splice.config.base import ConfigError, doc

#: exact compositions (no density), then the elementwise ones that need a density
EXACT_METHODS = ("linear", "cat", "svd")
PRUNING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
METHODS = EXACT_METHODS + PRUNING_METHODS
MAJORITY_SIGNS = ("total", "frequency")


@dataclass(frozen=True)
class CompositionConfig:
    """ΔW = combine(w₁·ΔW₁, …, wₙ·ΔWₙ) on every module, stored as a new LoRA pair (scaling 1)."""

    weights: tuple[float, ...] = doc(
        "One weight per adapter; a negative weight subtracts that adapter's behaviour.")
    method: str = doc(
        "'linear' (the exact sum Σ wᵢΔWᵢ, rank Σrᵢ, or its best rank-`rank` approximation), "
        "'cat' (the exact sum as concatenated factors), 'svd' (the sum truncated to `rank`), "
        "'ties', 'dare_linear', 'dare_ties', 'magnitude_prune' (elementwise on each ΔWᵢ, then "
        "truncated to `rank`).", default="linear")
    density: float | None = doc(
        "Fraction of each update's entries kept by ties, dare_* and magnitude_prune, in (0, 1].",
        default=None)
    rank: int | None = doc(
        "Rank of the composed adapter (svd and the elementwise methods; default the largest input "
        "rank; 'linear' with a rank truncates the exact sum). 'cat' is always exact.",
        default=None)
    majority_sign: str = doc(
        "How ties / dare_ties elect the sign of an entry: 'total' (the sign of the sum of the "
        "updates) or 'frequency' (the sign most updates hold).", default="total")
    seed: int = doc("Seed of the random drop of dare_linear / dare_ties.", default=0)

    def __post_init__(self) -> None:
        weights = self.weights
        if isinstance(weights, (int, float)) or not weights:
            raise ConfigError(f"weights={weights!r}: give one weight per adapter, e.g. (1.0, -0.5)")
        weights = tuple(weights)
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
               for w in weights):
            raise ConfigError(f"weights={weights!r}: every weight must be a finite number")
        object.__setattr__(self, "weights", tuple(float(w) for w in weights))
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: choose one of {', '.join(METHODS)}")
        self._check_density()
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank < 1):
            raise ConfigError(f"rank={self.rank!r}: the rank must be a positive integer (e.g. 8)")
        if self.method == "cat" and self.rank is not None:
            raise ConfigError("rank is set but method='cat' is exact at rank Σrᵢ; use method='svd' "
                              "(or 'linear' with a rank) for a smaller adapter")
        if self.majority_sign not in MAJORITY_SIGNS:
            raise ConfigError(f"majority_sign={self.majority_sign!r}: choose one of "
                              f"{', '.join(MAJORITY_SIGNS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r}: give an integer seed")

    def _check_density(self) -> None:
        density: Any = self.density
        if self.method in PRUNING_METHODS:
            if density is None:
                raise ConfigError(f"method={self.method!r} needs a density: the fraction of each "
                                  "update's entries to keep, in (0, 1] (e.g. density=0.5)")
            if isinstance(density, bool) or not isinstance(density, (int, float)) or not (
                    0.0 < density <= 1.0):
                raise ConfigError(f"density={density!r}: give a fraction in (0, 1], e.g. 0.5")
        elif density is not None:
            raise ConfigError(f"density is set but method={self.method!r} keeps every entry; use "
                              f"one of {', '.join(PRUNING_METHODS)}, or leave density unset")

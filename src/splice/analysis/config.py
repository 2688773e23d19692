"""What `analyze_adapter` measures: the intruder-dimension settings. No torch import."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from splice.config.base import ConfigError, doc

#: the ε sweep reported by default
DEFAULT_EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: the threshold of the headline count (AdapterSummary.intruder_dimensions)
DEFAULT_EPSILON = 0.5
#: the number of top singular vectors of the tuned matrix examined, as in the paper
DEFAULT_TOP_K = 10


@dataclass(frozen=True)
class AnalysisConfig:
    """Intruder dimensions: of the top `top_k` left singular vectors of each W₀ + ΔW, those whose
    largest |cosine| with every singular vector of W₀ is below ε."""

    top_k: int = doc("How many of the tuned matrix's top singular vectors to examine (the paper "
                     "uses 10).", default=DEFAULT_TOP_K)
    epsilons: tuple[float, ...] = doc(
        "The cosine thresholds ε of the sweep, each in (0, 1].", default=DEFAULT_EPSILONS)
    epsilon: float = doc(
        "The threshold of the summary's single intruder count (intruder_dimensions), in (0, 1].",
        default=DEFAULT_EPSILON)

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k!r}: examine a positive number of singular "
                              "vectors (the paper uses 10)")
        epsilons: Any = self.epsilons
        if isinstance(epsilons, (int, float)) or not epsilons:
            raise ConfigError(f"epsilons={epsilons!r}: give one or more thresholds, e.g. "
                              "(0.3, 0.5, 0.7)")
        epsilons = tuple(epsilons)
        for e in epsilons + (self.epsilon,):
            if not _is_fraction(e):
                raise ConfigError(f"epsilon {e!r}: a cosine threshold must be a number in (0, 1], "
                                  "e.g. 0.5")
        object.__setattr__(self, "epsilons", tuple(sorted(float(e) for e in set(epsilons))))
        object.__setattr__(self, "epsilon", float(self.epsilon))


def _is_fraction(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value) and 0.0 < value <= 1.0)

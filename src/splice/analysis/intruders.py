"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
Equivalence"): new high-ranking singular vectors that fine-tuning put into a weight matrix.

With W₀ = U₀Σ₀V₀ᵀ and W₀ + ΔW = UₜΣₜVₜᵀ (thin SVDs, matrices as (out, in), so the left singular
vectors live in the output space), the j-th of the top k left singular vectors of the tuned
matrix is an intruder at threshold ε when

    maxᵢ |cos(U₀[:, i], Uₜ[:, j])| < ε        over all min(out, in) singular vectors of W₀

(the absolute value because a singular vector's sign is arbitrary). The paper uses k = 10, sums
the counts over a model's matrices and sweeps ε; low-rank LoRA shows intruders, full fine-tuning
almost never does, and their number tracks forgetting. Every threshold reads the same k maxima,
so a sweep costs one similarity matrix U₀ᵀUₜ[:, :k].

The thin SVD of W₀ dominates the cost and does not change between adapters: `BaseSVDCache`
keeps it per base weight for one run (or across runs on the same model object).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from splice.analysis.config import DEFAULT_EPSILONS, DEFAULT_TOP_K


def left_singular_vectors(weight: torch.Tensor) -> torch.Tensor:
    """U of the thin SVD of an (out, in) matrix, fp32, (out, min(out, in)), columns by
    descending singular value."""
    u, _, _ = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    return u


class BaseSVDCache:
    """U₀ per base weight, keyed by the tensor's storage, version counter, shape and layout, so
    an in-place change (a merge, an optimizer step) computes it afresh."""

    def __init__(self) -> None:
        # key -> (the weight itself, U₀): holding the weight keeps its storage from being freed
        # and handed to another tensor, which would then hit a stale entry.
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.misses = 0

    def left_vectors(self, weight: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """U₀ of `weight` (of `weight.T` when `transpose`)."""
        if weight.is_inference():  # no version counter: an in-place change would go unseen
            self.misses += 1
            return left_singular_vectors(weight.T if transpose else weight)
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(),
               weight.dtype, weight.device, transpose)
        if key not in self._entries:
            self.misses += 1
            self._entries[key] = (weight, left_singular_vectors(weight.T if transpose else weight))
        return self._entries[key][1]

    def clear(self) -> None:
        self._entries.clear()


@dataclass(frozen=True)
class IntruderCounts:
    """Intruder dimensions of one tuned matrix."""

    max_cosines: tuple[float, ...]   # per top-k tuned vector: max |cos| with any vector of W₀
    counts: dict[float, int]         # ε -> how many of the top k are intruders at ε

    def count(self, epsilon: float) -> int:
        """The number of intruders at any threshold (not only the swept ones)."""
        return sum(c < epsilon for c in self.max_cosines)

    def intruder_indices(self, epsilon: float) -> list[int]:
        """Positions (0 = largest singular value) of the intruders at ε."""
        return [j for j, c in enumerate(self.max_cosines) if c < epsilon]


def intruder_dimensions(w0: torch.Tensor, w_tuned: torch.Tensor, top_k: int = DEFAULT_TOP_K,
                        epsilons: Sequence[float] = DEFAULT_EPSILONS, *,
                        base_vectors: torch.Tensor | None = None) -> IntruderCounts:
    """Count the intruder dimensions of `w_tuned` against `w0`, both (out, in), for each ε.

    `base_vectors` is U₀ if already known (BaseSVDCache); top_k is capped at min(out, in)."""
    if w0.shape != w_tuned.shape:
        raise ValueError(f"the base matrix is {tuple(w0.shape)} but the tuned one is "
                         f"{tuple(w_tuned.shape)}; pass the same matrix before and after")
    if top_k < 1:
        raise ValueError(f"top_k={top_k}: examine at least one singular vector (the paper uses 10)")
    u0 = left_singular_vectors(w0) if base_vectors is None else base_vectors   # (out, n)
    u_t = left_singular_vectors(w_tuned)[:, :top_k]                            # (out, k)
    max_cos = (u0.T @ u_t).abs().amax(dim=0)                                   # (k,)
    return IntruderCounts(tuple(max_cos.tolist()),
                          {float(e): int((max_cos < e).sum()) for e in epsilons})

"""How alike two weight updates are: the cosine of their flattened matrices.

    cos(ΔW₁, ΔW₂) = ⟨ΔW₁, ΔW₂⟩_F / (‖ΔW₁‖_F·‖ΔW₂‖_F),   ⟨X, Y⟩_F = Σᵢⱼ XᵢⱼYᵢⱼ

For low-rank updates ΔWₖ = sₖ·Bₖ·Aₖ the inner product needs only r×r products:

    ⟨B₁A₁, B₂A₂⟩_F = trace(A₁ᵀB₁ᵀB₂A₂) = trace((B₁ᵀB₂)(A₂A₁ᵀ))

(the trace is invariant under cyclic shifts), which costs O((out + in)·r₁·r₂) instead of
O(out·in·r). 1: the same update up to a positive scale; −1: opposite; ≈ 0 for unrelated ones
(two independent random updates of out×in entries give |cos| of order 1/√(out·in)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Update:
    """One update, as factors (ΔW = scaling·B·A) or dense (ΔW = dense), (out, in)."""

    a: torch.Tensor | None = None      # (r, in)
    b: torch.Tensor | None = None      # (out, r)
    scaling: float = 1.0
    dense: torch.Tensor | None = None  # (out, in)

    def matrix(self) -> torch.Tensor:
        """ΔW, fp64, (out, in)."""
        if self.dense is not None:
            return self.dense.detach().double()
        return (self.b.detach().double() @ self.a.detach().double()) * self.scaling


def inner_product(x: Update, y: Update) -> float:
    """⟨ΔWₓ, ΔWᵧ⟩_F, from the factors when both have them, fp64."""
    if x.dense is None and y.dense is None:
        a1, b1 = x.a.detach().double(), x.b.detach().double()     # (r₁, in), (out, r₁)
        a2, b2 = y.a.detach().double(), y.b.detach().double()     # (r₂, in), (out, r₂)
        left = b1.T @ b2                                          # (r₁, r₂)
        right = a2 @ a1.T                                         # (r₂, r₁)
        return float((left * right.T).sum()) * x.scaling * y.scaling   # trace(left·right)
    return float((x.matrix() * y.matrix()).sum())


def cosine(x: Update, y: Update) -> float:
    """cos(ΔWₓ, ΔWᵧ); 0 when either update is zero."""
    norms = (inner_product(x, x) * inner_product(y, y)) ** 0.5
    return inner_product(x, y) / norms if norms > 0 else 0.0

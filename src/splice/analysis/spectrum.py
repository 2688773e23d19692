"""The singular value spectrum of a weight update ΔW and how many directions it really uses.

Pure tensor functions: no modules, no adapters.

A LoRA update ΔW = s·B·A (B: (out, r), A: (r, in)) has at most r nonzero singular values, and
they come from an r×r problem: with B = Q_B·R_B and Aᵀ = Q_A·R_A (thin QR, Q with orthonormal
columns),

    ΔW = s·Q_B·(R_B·R_Aᵀ)·Q_Aᵀ,   so   σ(ΔW) = |s|·σ(R_B·R_Aᵀ)

because multiplying by matrices with orthonormal columns keeps singular values. That costs
O((out + in)·r²) instead of an SVD of the (out, in) matrix.

Effective rank, two definitions (both reported, both scale-free):

    entropy rank (Roy & Vetterli 2007)   exp(H(p)),  pᵢ = σᵢ / Σⱼσⱼ,  H(p) = −Σ pᵢ log pᵢ
        1 for a rank-1 update, n for n equal singular values, in between otherwise: how many
        directions the update spreads over. Divided by the rank budget r it says how much of the
        budget the adapter uses.
    energy rank at f                     the fewest k with Σ_{i≤k} σᵢ² ≥ f·Σ σᵢ²
        (f = 0.9 and 0.99): how many directions hold that fraction of ‖ΔW‖_F².

A zero update has entropy rank 0 and energy rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: energy fractions whose energy rank the spectra report
ENERGY_FRACTIONS = (0.9, 0.99)


def factor_singular_values(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """σ(s·B·A), descending, fp32, without forming the product: r values for rank r."""
    # a (r, in), b (out, r) -> (r,)
    a64, b64 = a.detach().double(), b.detach().double()
    _, r_b = torch.linalg.qr(b64)                       # (out, r), (r, r)
    _, r_a = torch.linalg.qr(a64.T)                     # (in, r), (r, r)
    core = r_b @ r_a.T                                  # (r, r): Q_B·core·Q_Aᵀ = B·A
    return (torch.linalg.svdvals(core) * abs(scaling)).float()


def dense_singular_values(delta: torch.Tensor) -> torch.Tensor:
    """σ(ΔW), descending, fp32: min(out, in) values."""
    return torch.linalg.svdvals(delta.detach().float())


def entropy_effective_rank(values: torch.Tensor) -> float:
    """exp of the entropy of σ/Σσ (Roy & Vetterli 2007); 0 for a zero update."""
    values = values.double().clamp_min(0)
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(values: torch.Tensor, fraction: float) -> int:
    """The fewest leading singular values holding `fraction` of Σσ²; 0 for a zero update."""
    energy = values.double().pow(2)
    total = energy.sum()
    if total <= 0:
        return 0
    # A relative slack of 1e-12 keeps an exact-fraction spectrum from rounding one step up.
    held = torch.cumsum(energy, 0) >= (fraction - 1e-12) * total
    return int(held.nonzero()[0, 0]) + 1


@dataclass(frozen=True)
class Spectrum:
    """The singular values of one update and the numbers derived from them."""

    values: tuple[float, ...]          # σ₁ ≥ σ₂ ≥ …
    norm: float                        # ‖ΔW‖_F = √Σσ²
    entropy_rank: float                # Roy & Vetterli effective rank
    energy_ranks: dict[float, int]     # fraction -> energy rank

    @classmethod
    def of(cls, values: torch.Tensor) -> "Spectrum":
        values = values.detach().float().cpu()
        return cls(tuple(values.tolist()), float(values.double().pow(2).sum().sqrt()),
                   entropy_effective_rank(values),
                   {f: energy_rank(values, f) for f in ENERGY_FRACTIONS})

"""Composing LoRA updates: pure functions from several adapters' factors on one module to one
new pair of factors. No modules, no I/O.

Adapter i contributes ΔWᵢ = sᵢ·Bᵢ·Aᵢ (Aᵢ: (rᵢ, in), Bᵢ: (out, rᵢ)) with weight wᵢ; a negative
weight subtracts a behaviour. Every result is a pair (A, B) used with scaling 1, ΔW ≈ B·A:

    cat              A = [A₁; …; Aₙ], B = [w₁s₁B₁, …, wₙsₙBₙ]: B·A = Σ wᵢΔWᵢ exactly, rank Σrᵢ
    linear           Σ wᵢΔWᵢ exactly (as cat), or with a rank k its best rank-k approximation
    svd              Σ wᵢΔWᵢ truncated to rank k (default: the largest rᵢ)
    magnitude_prune  Σ wᵢ·trim(ΔWᵢ)
    ties             TIES-merging (Yadav et al. 2023): trim each ΔWᵢ, elect a sign per entry,
                     average the weighted entries that agree with it (the disjoint mean)
    dare_linear      DARE (Yu et al. 2023): Σ wᵢ·drop(ΔWᵢ)
    dare_ties        drop each ΔWᵢ, then ties' election and disjoint mean

    trim(t)  keeps the ⌊density·numel⌋ entries of largest magnitude and zeroes the rest
    drop(t)  keeps each entry with probability density and rescales by 1/density: E[drop(t)] = t

The elementwise methods (the last four) run on the dense (out, in) updates, so their result has
full rank in general: it is truncated to rank k by SVD. Truncation is the only approximation:
`Composed.error` = ‖ΔW − B·A‖_F / ‖ΔW‖_F, ΔW the composed update before truncation, which is
√(Σ_{j>k} σⱼ²) / √(Σ σⱼ²) over ΔW's singular values σ. The singular values are split evenly
between the factors (B = U√Σ, A = √Σ Vᵀ). A rank above the number of nonzero singular values
is padded with zero components, so every module gets the rank asked for.

The sign election reads the trimmed (or dropped) updates before weighting: the elected sign of an
entry is that of Σᵢ tᵢ ("total") or the one most tᵢ hold ("frequency"), + on a tie. So a weight
scales what an adapter contributes without changing which entries it votes for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from splice.merge.compose_config import PRUNING_METHODS


@dataclass(frozen=True)
class LoRAUpdate:
    """One adapter's factors on one module: ΔW = scaling·B·A."""

    a: torch.Tensor   # (r, in)
    b: torch.Tensor   # (out, r)
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """ΔW in fp32, (out, in)."""
        return (self.b.float() @ self.a.float()) * self.scaling


@dataclass(frozen=True)
class Composed:
    """The composed update as a LoRA pair with scaling 1: ΔW ≈ B·A."""

    a: torch.Tensor   # (k, in), fp32
    b: torch.Tensor   # (out, k), fp32
    error: float      # ‖ΔW − B·A‖_F / ‖ΔW‖_F: 0 when exact (or ΔW = 0)
    norm: float       # ‖ΔW‖_F, the composed update before truncation

    @property
    def rank(self) -> int:
        return self.a.shape[0]


# -- exact compositions, on the factors ----------------------------------------------------------

def cat(updates: Sequence[LoRAUpdate], weights: Sequence[float]) -> Composed:
    """Σ wᵢΔWᵢ exactly, as concatenated factors of rank Σrᵢ."""
    _check_pairs(updates, weights)
    a = torch.cat([u.a.float() for u in updates], dim=0)                        # (Σr, in)
    b = torch.cat([u.b.float() * (w * u.scaling)
                   for u, w in zip(updates, weights)], dim=1)                   # (out, Σr)
    return Composed(a, b, 0.0, product_norm(b, a))


def linear(updates: Sequence[LoRAUpdate], weights: Sequence[float],
           rank: int | None = None) -> Composed:
    """Σ wᵢΔWᵢ: exact (as `cat`) without a rank, else its best rank-`rank` approximation."""
    exact = cat(updates, weights)
    return exact if rank is None else truncate_product(exact.b, exact.a, rank)


def svd(updates: Sequence[LoRAUpdate], weights: Sequence[float],
        rank: int | None = None) -> Composed:
    """Σ wᵢΔWᵢ truncated by SVD to `rank` (default: the largest input rank)."""
    exact = cat(updates, weights)
    return truncate_product(exact.b, exact.a, rank or max(u.rank for u in updates))


def product_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B·A‖_F from the (R, R) Gram matrices, without forming B·A: tr(BᵀB·AAᵀ)."""
    b64, a64 = b.double(), a.double()
    return float(((b64.T @ b64) * (a64 @ a64.T)).sum().clamp_min(0.0).sqrt())


def truncate_product(b: torch.Tensor, a: torch.Tensor, rank: int) -> Composed:
    """Best rank-`rank` approximation of B·A (B: (out, R), A: (R, in)) without forming it.

    B = Q_b R_b and Aᵀ = Q_a R_a (QR), so B·A = Q_b (R_b R_aᵀ) Q_aᵀ and the SVD of the small core
    R_b R_aᵀ gives B·A's: U = Q_b U_c, Σ = Σ_c, Vᵀ = V_cᵀ Q_aᵀ. In fp64: cheap at these sizes."""
    q_b, r_b = torch.linalg.qr(b.double())                  # (out, m), (m, R)
    q_a, r_a = torch.linalg.qr(a.double().T)                # (in, n), (n, R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)   # (m, p), (p,), (p, n)
    return _truncated(q_b @ u, s, vh @ q_a.T, rank)


def truncate(delta: torch.Tensor, rank: int) -> Composed:
    """Best rank-`rank` approximation of a dense update (out, in), by SVD."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)  # (out, p), (p,), (p, in)
    return _truncated(u, s, vh, rank)


def _truncated(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Composed:
    # u (out, p), s (p,) descending, vh (p, in) -> B (out, rank), A (rank, in)
    if rank < 1:
        raise ValueError(f"rank={rank}: the rank must be a positive integer")
    k = min(rank, s.shape[0])
    total = float(s.double().pow(2).sum())
    tail = float(s[k:].double().pow(2).sum())
    root = s[:k].sqrt()
    b = torch.zeros(u.shape[0], rank, dtype=torch.float32, device=u.device)
    a = torch.zeros(rank, vh.shape[1], dtype=torch.float32, device=vh.device)
    b[:, :k] = (u[:, :k] * root).float()
    a[:k] = (root[:, None] * vh[:k]).float()
    error = (tail / total) ** 0.5 if total > 0 else 0.0
    return Composed(a, b, error, total ** 0.5)


# -- elementwise compositions, on dense updates --------------------------------------------------

def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·numel⌋ entries of largest magnitude; zero the rest."""
    _check_density(density)
    if density >= 1.0:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)       # (numel,)
    keep[t.abs().flatten().topk(int(density * t.numel()), sorted=False).indices] = 1  # a set
    return t * keep.view(t.shape)


def drop(t: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry with probability `density` and rescale by 1/density.

    The mask is drawn on the CPU from `generator`, in t's layout, so a seed gives the same mask
    whatever device t lives on. density = 1 keeps everything and draws nothing."""
    _check_density(density)
    if density >= 1.0:
        return t
    p = torch.full(t.shape, density, dtype=torch.float32)
    keep = torch.bernoulli(p, generator=generator).to(device=t.device, dtype=t.dtype)
    return t * keep / density


def agrees_with_elected_sign(stacked: torch.Tensor, majority_sign: str = "total") -> torch.Tensor:
    """(n, ...) updates -> (n, ...) bool: entry has the elected sign (zeros never agree)."""
    signs = stacked.sign()
    if majority_sign == "total":
        votes = stacked.sum(dim=0)
    elif majority_sign == "frequency":
        votes = signs.sum(dim=0)
    else:
        raise ValueError(f"majority_sign={majority_sign!r}: choose 'total' or 'frequency'")
    elected = torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)         # (...)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """(n, ...) weighted updates, (n, ...) agreement -> (...): the mean over agreeing entries."""
    count = agree.sum(dim=0).clamp(min=1)
    return (weighted * agree).sum(dim=0) / count


def magnitude_prune(deltas: Sequence[torch.Tensor], weights: Sequence[float],
                    density: float) -> torch.Tensor:
    """Σ wᵢ·trim(ΔWᵢ)."""
    return _weighted(torch.stack([trim(d, density) for d in deltas]), weights).sum(dim=0)


def ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
         majority_sign: str = "total") -> torch.Tensor:
    """Trim, elect a sign per entry, disjoint mean of the weighted agreeing entries."""
    trimmed = torch.stack([trim(d, density) for d in deltas])           # (n, out, in)
    agree = agrees_with_elected_sign(trimmed, majority_sign)
    return disjoint_mean(_weighted(trimmed, weights), agree)


def dare_linear(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Σ wᵢ·drop(ΔWᵢ)."""
    return _weighted(torch.stack([drop(d, density, generator) for d in deltas]), weights).sum(dim=0)


def dare_ties(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
              generator: torch.Generator | None = None,
              majority_sign: str = "total") -> torch.Tensor:
    """Drop, elect a sign per entry, disjoint mean of the weighted agreeing entries."""
    dropped = torch.stack([drop(d, density, generator) for d in deltas])  # (n, out, in)
    agree = agrees_with_elected_sign(dropped, majority_sign)
    return disjoint_mean(_weighted(dropped, weights), agree)


def _weighted(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    # stacked (n, ...) -> (n, ...) with entry i scaled by wᵢ
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    return stacked * w.view(-1, *([1] * (stacked.dim() - 1)))


# -- one entry point -------------------------------------------------------------------------------

def compose(updates: Sequence[LoRAUpdate], weights: Sequence[float], method: str = "linear", *,
            density: float | None = None, rank: int | None = None, majority_sign: str = "total",
            generator: torch.Generator | None = None) -> Composed:
    """Compose adapters' updates on one module by `method` (see the module docstring)."""
    _check_pairs(updates, weights)
    if method == "cat":
        return cat(updates, weights)
    if method == "linear":
        return linear(updates, weights, rank)
    if method == "svd":
        return svd(updates, weights, rank)
    if method not in PRUNING_METHODS:
        raise ValueError(f"method={method!r}: choose linear, cat, svd or one of "
                         f"{', '.join(PRUNING_METHODS)}")
    if density is None:
        raise ValueError(f"method={method!r} needs a density in (0, 1]")
    combine: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] = {
        "magnitude_prune": lambda d: magnitude_prune(d, weights, density),
        "ties": lambda d: ties(d, weights, density, majority_sign),
        "dare_linear": lambda d: dare_linear(d, weights, density, generator),
        "dare_ties": lambda d: dare_ties(d, weights, density, generator, majority_sign),
    }
    dense = combine[method]([u.delta() for u in updates])                # (out, in)
    return truncate(dense, rank or max(u.rank for u in updates))


def _check_pairs(updates: Sequence[LoRAUpdate], weights: Sequence[float]) -> None:
    if not updates or len(updates) != len(weights):
        raise ValueError(f"{len(updates)} update(s) and {len(weights)} weight(s): give one "
                         "weight per update, and at least one update")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density={density!r}: give a fraction in (0, 1]")

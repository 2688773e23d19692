"""PiSSA (Meng et al. 2024): the adapter starts as the principal part of W, the base keeps the rest.

    W = U S Vᵀ,   A = √(S_r/s) V_rᵀ  (r, in),   B = U_r √(S_r/s)  (out, r),   base = W - s·B·A

so s·B·A is W's best rank-r approximation and the model is unchanged at step 0. S is divided by
s first so that the scaled product, not B·A, equals the top-r part. With `pissa_niter=K` the top
r triplets come from a randomized SVD (Halko et al.; K subspace iterations, r + 8 columns),
which costs O(out·in·r) instead of a full SVD's O(out·in·min(out, in)).
"""

from __future__ import annotations

import torch

from splice.config.lora import InitOptions
from splice.inits.registry import InitSpec, LowRankInit, register_init, residual_of

OVERSAMPLE = 8


def top_singular(weight: torch.Tensor, rank: int,
                 niter: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r (out, r), S_r (r,), V_rᵀ (r, in): exact, or randomized with `niter` iterations."""
    if niter is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    # A few extra columns (oversampling) make the top r far more accurate for the same
    # iterations, at little cost: q = r alone converges slowly where the spectrum is flat.
    q = min(rank + OVERSAMPLE, *weight.shape)
    u, s, v = torch.svd_lowrank(weight, q=q, niter=niter)
    return u[:, :rank], s[:rank], v[:, :rank].T


def pissa_init(weight: torch.Tensor, rank: int, scaling: float, options: InitOptions) -> LowRankInit:
    u, s, vh = top_singular(weight, rank, options.pissa_niter)   # (out, r), (r,), (r, in)
    root = (s / scaling).sqrt()                                   # (r,)
    return residual_of(weight, root[:, None] * vh, u * root[None, :], scaling)


register_init(InitSpec("pissa", pissa_init, "top-r singular triplets of W; the base keeps the rest"))

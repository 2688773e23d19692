"""OLoRA (Büyükakyüz 2024): the adapter starts from an orthonormal basis of W's columns.

    W = Q R,   B = Q[:, :r]  (out, r, orthonormal columns),   A = R[:r]  (r, in),
    base = W - s·B·A

so the model is unchanged at step 0. B·A is the part of W in the span of W's first r columns'
basis (not the best rank-r approximation, which is PiSSA's), and an orthonormal B keeps the
first updates well conditioned.
"""

from __future__ import annotations

import torch

from splice.config.lora import InitOptions
from splice.inits.registry import InitSpec, LowRankInit, register_init, residual_of


def olora_init(weight: torch.Tensor, rank: int, scaling: float, options: InitOptions) -> LowRankInit:
    q, r = torch.linalg.qr(weight)                   # (out, k), (k, in), k = min(out, in)
    return residual_of(weight, r[:rank], q[:, :rank], scaling)


register_init(InitSpec("olora", olora_init, "QR of W: B = Q_r, A = R_r; the base keeps the rest"))

"""LoRA-GA (Wang et al. 2024): A and B start so that the first LoRA step follows the full
fine-tuning gradient.

With G the gradient of the training loss with respect to W (averaged over a few batches) and
G = U S Vᵀ:

    A = ζ·V[:, :r]ᵀ  (r, in),   B = ζ·U[:, r:2r]  (out, r),   ζ = d_out^(1/4) / √γ,
    base = W - s·B·A   (the model is unchanged at step 0)

A gradient step on A and B then moves W by -η·s²·(G·AᵀA + B·Bᵀ·G) = -η·s²·ζ²·(G V_r V_rᵀ +
U_{r:2r} U_{r:2r}ᵀ G): G projected on its top 2r singular directions, which is what full
fine-tuning's step -η·G is closest to at rank 2r. A zero-B init's first step, G·AᵀA with a
random A, is a random projection of G. ζ is the paper's "stable" output scale. B and A are
the paper's: unit singular vectors times ζ, with no singular values folded into B.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

from splice.config.lora import InitOptions, LoRAConfig
from splice.core.errors import AdapterError
from splice.core.targets import Conv1D
from splice.inits.registry import InitSpec, LowRankInit, register_init, residual_of


def collect_gradients(model: nn.Module, targets: Mapping[str, nn.Module],
                      batches: Iterable[Mapping[str, torch.Tensor]],
                      config: LoRAConfig) -> dict[str, torch.Tensor]:
    """The mean over `batches` of ∂loss/∂W for every target, (out, in) fp32. Only the target
    weights require grad while it runs; every flag and .grad is restored after."""
    flags = {param: param.requires_grad for param in model.parameters()}
    kept = {path: module.weight.grad for path, module in targets.items()}
    count = 0
    try:
        for param in flags:
            param.requires_grad_(False)
        for module in targets.values():
            module.weight.requires_grad_(True)
            module.weight.grad = None
        with torch.enable_grad():
            for batch in batches:
                if batch.get("labels") is None:
                    raise AdapterError("lora_ga needs batches with labels (the training loss)")
                out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                            labels=batch["labels"])
                out.loss.backward()
                count += 1
        if count == 0:
            raise AdapterError("lora_ga needs at least one batch of training data")
        grads = {}
        for path, module in targets.items():
            grad = module.weight.grad
            if grad is None:
                raise AdapterError(f"lora_ga: {path} got no gradient; the loss does not reach it")
            grad = grad.float() / count
            grads[path] = grad.T.contiguous() if Conv1D and isinstance(module, Conv1D) else grad
        return grads
    finally:
        for path, module in targets.items():
            module.weight.grad = kept[path]
        for param, flag in flags.items():
            param.requires_grad_(flag)


def lora_ga_init(weight: torch.Tensor, rank: int, scaling: float, options: InitOptions,
                 grad: torch.Tensor) -> LowRankInit:
    if 2 * rank > min(grad.shape):
        raise AdapterError(f"lora_ga needs 2 x rank <= min(out, in) = {min(grad.shape)}; "
                           f"rank {rank} is too large for a {tuple(grad.shape)} weight")
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)           # (out, k), (k, in)
    zeta = grad.shape[0] ** 0.25 / math.sqrt(options.lora_ga_gamma)
    return residual_of(weight, zeta * vh[:rank], zeta * u[:, rank:2 * rank], scaling)


register_init(InitSpec("lora_ga", lora_ga_init, "A, B from the SVD of the full gradient; the base "
                       "keeps the rest", collect=collect_gradients))

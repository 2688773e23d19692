"""LoftQ (Li et al. 2023): quantize the base and fit the adapter to the quantization error.

    for each iteration:  Q = quant(W - s·B·A);   s·B·A = best rank-r approximation of W - deq(Q)
    base = deq(Q),   A = √(S_r/s) V_rᵀ,   B = U_r √(S_r/s)   (from the SVD of W - deq(Q))

so deq(Q) + s·B·A is closer to W than deq(quant(W)) is: a 4-bit base whose adapter starts by
undoing most of the quantization error, instead of a zero adapter on a damaged base. B and A are
divided by s so that the scaled update, as the layer applies it, fits the error.

`quant` is splice's NF4 (blocks of 64, double quantization: exactly what a 4-bit `Linear4bit`
stores) for bits=4, or int8 with one absmax per row for bits=8. The new base is deq(Q) in full
precision, a weight on the quantizer's grid: quantizing it again gives Q back (see
`quantize_adapted_bases`, which a QLoRA run uses to put the 4-bit base under the adapter).
"""

from __future__ import annotations

import torch
from torch import nn

from splice.config.lora import InitOptions
from splice.core.layer import adapter_layers
from splice.inits.pissa import top_singular
from splice.inits.registry import InitSpec, LowRankInit, register_init
from splice.quant.linear4bit import Linear4bit
from splice.quant.nf4 import dequantize_nf4, quantize_nf4
from splice.quant.surgery import rehome_kept_tensors

NF4_BLOCK = 64


def quantize_roundtrip(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """deq(quant(weight)), (out, in) fp32."""
    if bits == 4:
        return dequantize_nf4(quantize_nf4(weight, block_size=NF4_BLOCK, double_quant=True), torch.float32)
    scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127    # (out, 1)
    return (weight / scale).round_().clamp_(-127, 127).mul_(scale)


def loftq_init(weight: torch.Tensor, rank: int, scaling: float, options: InitOptions) -> LowRankInit:
    update = torch.zeros_like(weight)                                # s·B·A, (out, in)
    for _ in range(options.loftq_iterations):
        base = quantize_roundtrip(weight - update, options.loftq_bits)
        u, s, vh = top_singular(weight - base, rank, None)            # (out, r), (r,), (r, in)
        root = (s / scaling).sqrt()
        a, b = root[:, None] * vh, u * root[None, :]
        update = scaling * (b @ a)
    return LowRankInit(a=a.contiguous(), b=b.contiguous(), base=base, residual=False)


@torch.no_grad()
def quantize_adapted_bases(model: nn.Module, *, block_size: int = NF4_BLOCK,
                           double_quant: bool = True) -> int:
    """Put every full-precision nn.Linear of an adapted model (the bases under its adapter
    layers and the unadapted linears, but not the output head or the adapters' own layers) in
    NF4, in place; returns how many. After a LoftQ init the bases hold deq(Q), so their 4-bit
    form is Q itself, up to the rounding of the double-quantized block scales."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    adapter_parts = {id(m) for _, layer in adapter_layers(model)
                     for prefix in layer.adapter_prefixes for m in getattr(layer, prefix).modules()}
    swaps = []
    for path, module in model.named_modules():
        if type(module) is nn.Linear and module is not head and id(module) not in adapter_parts:
            swaps.append((path, Linear4bit.from_linear(module, block_size=block_size,
                                                        double_quant=double_quant).train(module.training)))
    for path, quantized in swaps:
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, quantized)
    rehome_kept_tensors(model)
    return len(swaps)


register_init(InitSpec("loftq", loftq_init,
                       "the base becomes deq(quant(W - s·B·A)) and s·B·A fits the quantization error"))

"""`Linear4bit`: a frozen linear layer stored in NF4 and dequantized on the fly.

    y = x · deq(Q)ᵀ + b,   Q = NF4 codes + block scales of the original weight W (out, in)

No full-precision copy of W is kept between calls: each forward dequantizes into a transient
(out, in) tensor in `compute_dtype`, multiplies and drops it; backward dequantizes again for the
input gradient (see Note: Recompute the weight in backward). The NF4 tensors are buffers, never
parameters: nothing trains them and no optimizer sees them, so the bytes cannot change during
training. Gradients flow to the input (and so to adapters on top) and, when it trains, the bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from splice.quant.kernels import nf4_matmul_weight
from splice.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

# Note: fp32 buffers kept as int32 bits
# `model.to(torch.bfloat16)` casts every floating-point buffer. The block scales (absmax, the
# nested scales, the offset) are fp32 by format; cast to bf16 they would lose 16 bits and the
# weight would no longer be the quantized one. Stored as their int32 bit pattern (a view, no
# copy), dtype casts pass them by, while `.to(device)` still moves them.

# Note: Recompute the weight in backward
# Saving the dequantized weight for backward would keep every layer's full-precision weight
# alive until its backward runs: the whole model in fp32 again at the peak, which QLoRA exists
# to avoid. Dequantizing a second time costs one more pass over 4-bit bytes per layer and step.

_FLOAT_BUFFERS = ("absmax", "nested_absmax", "offset")


def _as_bits(t: Tensor) -> Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _from_bits(t: Tensor, was_float: bool) -> Tensor:
    return t.view(torch.float32) if was_float else t


class _NF4LinearFn(torch.autograd.Function):
    """y = x deq(Q)ᵀ + b with Q fixed. See Note: Recompute the weight in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, layer: "Linear4bit") -> Tensor:
        # x (..., in), bias (out,) or None -> (..., out) in x's dtype
        dtype = layer.compute_dtype
        y = F.linear(x.to(dtype), nf4_matmul_weight(layer.quant, dtype),
                     None if bias is None else bias.to(dtype))
        ctx.layer, ctx.x_dtype = layer, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        need_x, need_bias, _ = ctx.needs_input_grad
        layer = ctx.layer
        grad_x = grad_bias = None
        if need_x:
            weight = nf4_matmul_weight(layer.quant, layer.compute_dtype)       # (out, in)
            grad_x = (grad_y.to(layer.compute_dtype) @ weight).to(ctx.x_dtype)  # (..., in)
        if need_bias:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


class Linear4bit(nn.Module):
    """A frozen NF4 linear layer; `compute_dtype` is the matmul dtype (fp32 on CPU, bf16 on GPU)."""

    def __init__(self, quant: NF4Weight, bias: Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if len(quant.shape) != 2:
            raise ValueError(f"Linear4bit needs a 2-D (out, in) weight, got shape {quant.shape}")
        self.out_features, self.in_features = quant.shape
        self.compute_dtype = compute_dtype
        self.weight_dtype = quant.dtype
        self.block_size, self.double_block_size = quant.block_size, quant.double_block_size
        self.register_buffer("nf4_packed", quant.packed)
        self._float_buffers = []
        for name in _FLOAT_BUFFERS:
            value = getattr(quant, name)
            if value is not None:
                self.register_buffer(f"nf4_{name}", _as_bits(value))
                if value.dtype == torch.float32:
                    self._float_buffers.append(name)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, block_size: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "Linear4bit":
        """Quantize an nn.Linear's weight; compute dtype defaults to the weight's dtype."""
        quant = quantize_nf4(linear.weight.detach(), block_size=block_size, double_quant=double_quant)
        return cls(quant, linear.bias, compute_dtype or linear.weight.dtype)

    @property
    def quant(self) -> NF4Weight:
        """The NF4Weight these buffers hold (a cheap view, rebuilt on each call)."""
        def buffer(name: str) -> Tensor | None:
            value = getattr(self, f"nf4_{name}", None)
            return None if value is None else _from_bits(value, name in self._float_buffers)
        return NF4Weight(packed=self.nf4_packed, absmax=buffer("absmax"),
                         shape=(self.out_features, self.in_features), dtype=self.weight_dtype,
                         block_size=self.block_size, nested_absmax=buffer("nested_absmax"),
                         offset=buffer("offset"), double_block_size=self.double_block_size)

    @property
    def packed_param_count(self) -> int:
        """Weights the NF4 buffers stand for (parameter counts include them)."""
        return self.out_features * self.in_features

    @property
    def device(self) -> torch.device:
        return self.nf4_packed.device

    @property
    def double_quant(self) -> bool:
        return "nested_absmax" in self._float_buffers

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight the NF4 bytes stand for, in `dtype` (default: compute dtype),
        a tensor of its own."""
        return dequantize_nf4(self.quant, dtype or self.compute_dtype)

    def matmul_weight(self) -> Tensor:
        """The dense weight for one matmul, right now: a shared scratch tensor that the next
        4-bit layer overwrites (see splice.quant.kernels). Never keep it."""
        return nf4_matmul_weight(self.quant, self.compute_dtype)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight as held in memory (codes and scales, no bias)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n.startswith("nf4_"))

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the dequantized weight (and the bias), frozen."""
        dtype = dtype or self.weight_dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(torch.float32))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def forward(self, x: Tensor) -> Tensor:
        """(..., in_features) -> (..., out_features)."""
        return _NF4LinearFn.apply(x, self.bias, self)

    def extra_repr(self) -> str:
        bits = "double-quantized " if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {bits}nf4 block={self.block_size}, "
                f"compute_dtype={self.compute_dtype}")

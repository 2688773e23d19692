"""LoRA (Hu et al. 2021): a frozen base plus a trainable low-rank update.

    y = W₀x + s·B·A·dropout(x),   A: (r, d_in), B: (d_out, r),   s = α/r  (α/√r with rsLoRA)

A starts kaiming-uniform (a=√5) or Gaussian N(0, 1/r); B starts at zero, so ΔW = s·B·A = 0 and the
adapted model equals the base model at step 0. For embeddings the roles swap (A = 0, B ~ N(0, 1)),
because an embedding's "input" is a one-hot row: ΔE = s·(B·A)ᵀ, shape (num_embeddings, dim).
Other starts for linear layers (PiSSA, OLoRA, LoftQ, EVA, LoRA-GA) come from splice.inits; see
Note: Inits that change the base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from splice.config.lora import LoRAConfig
from splice.core.errors import AdapterError
from splice.core.layer import AdapterLayer
from splice.core.registry import MethodSpec, implements, register_method
from splice.core.routing import routable, route_for
from splice.core.targets import Conv1D
from splice.inits import LowRankInit, get_init
from splice.methods.lora_batched import forget_stacks, routed_embedding, routed_linear
from splice.quant.linear4bit import Linear4bit

register_method(MethodSpec(
    name="lora", config_cls=LoRAConfig, peft_type="LORA",
    matches_peft=lambda data: not data.get("use_dora", False),
    trains="low-rank update B·A per weight", mergeable=True))


def linear_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) for nn.Linear and GPT-2's Conv1D."""
    if Conv1D and isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape  # Conv1D stores the weight as (in, out)
        return d_in, d_out, True
    return base.in_features, base.out_features, False


def adapter_factory(weight: torch.Tensor) -> dict:
    """Adapter tensors live beside the base weight, in its dtype (fp32 under a non-float base)."""
    return {"device": weight.device,
            "dtype": weight.dtype if weight.is_floating_point() else torch.float32}


def init_lora_a(weight: torch.Tensor, init: str) -> None:
    if init == "gaussian":
        nn.init.normal_(weight, std=1.0 / weight.shape[0])
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


# Note: LoRA's autograd
# Left to autograd, `base(x) + s·B(A(x))` allocates three (…, out) tensors in forward (B's
# output, its scaled copy, the sum), keeps h = x Aᵀ, and in backward allocates the scaled
# gradient and a second (…, in) gradient for x, then their sum. Those short-lived buffers cost
# time (a third of LoRA's extra time per layer) and, interleaved on the heap with the
# activations kept for backward, peak RSS through fragmentation (18% of a SmolLM2 LoRA step's
# peak: bench/train_step.py). For a plain nn.Linear base, _LoRALinearFn runs the same math
# with at most one transient (…, out) buffer each way:
#     forward    y = x W₀ᵀ + b₀;   y += ((x Aᵀ) Bᵀ)·s                 (added in place)
#     backward   g_h = s·∂y B (n, r);   ∂x = ∂y W₀ + g_h A             (addmm in place)
#                ∂A = g_hᵀ x;   ∂B = s·∂yᵀ (x Aᵀ);   ∂W₀ = ∂yᵀ x;   ∂b₀ = Σ ∂y
# Each gradient is computed only when its input needs it. It keeps only x (the input itself,
# no copy, and only when A, B or W₀ trains) and recomputes the small x Aᵀ in backward rather
# than keeping it between the activations. With dropout, the adapter reads x' = dropout(x):
# x' is kept instead, and its gradient g_h A goes back through dropout. The result equals the
# plain path up to fp rounding. Under a frozen NF4 base (QLoRA) W₀ is not a tensor but
# `dense_weight()`, a dequantization, called in forward and again in backward: keeping its
# result for backward would hold every layer's full-precision weight at once.


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., k) -> (n, k), a view when t is contiguous."""
    return t.reshape(-1, t.shape[-1])


def _fresh_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x Wᵀ + b in a tensor of its own. F.linear returns a view for (…, in) inputs with a bias,
    and a view leaving a custom autograd function may not be modified in place later."""
    y = x.new_empty(*x.shape[:-1], weight.shape[0])                     # (..., out)
    if bias is None:
        torch.mm(_rows(x), weight.T, out=_rows(y))
    else:
        torch.addmm(bias, _rows(x), weight.T, out=_rows(y))
    return y


class _LoRALinearFn(torch.autograd.Function):
    """y = x W₀ᵀ + b₀ + s·(x' Aᵀ) Bᵀ with x' = x unless given. See Note: LoRA's autograd."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling, dense_weight=None):
        # x (..., in), x_lora (..., in) or None, weight (out, in) or None with dense_weight() a
        # frozen quantized base's dequantizer, bias (out,) or None, lora_a (r, in),
        # lora_b (out, r) -> (..., out)
        xl = x if x_lora is None else x_lora
        y = _fresh_linear(x, weight if weight is not None else dense_weight(), bias)  # (..., out)
        h = _rows(xl) @ lora_a.T                                        # (n, r)
        # (h Bᵀ)·s then add, in the order the unfused path (and peft) rounds in: files trained
        # here and there give the same logits to 1e-5 even for non-power-of-two scalings.
        _rows(y).add_((h @ lora_b.T).mul_(scaling))                      # (n, out)
        need_x, need_xl, need_w, _, need_a, need_lb = ctx.needs_input_grad[:6]
        ctx.save_for_backward(x if need_w else None, xl if need_a or need_lb else None,
                              weight if need_x else None, lora_a, lora_b)
        ctx.scaling, ctx.fused_x, ctx.dense_weight = scaling, x_lora is None, dense_weight
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, xl, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xl, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:6]
        g = _rows(grad_y)                                               # (n, out)
        g_h = (g @ lora_b).mul_(ctx.scaling)                            # (n, r)
        grad_x = grad_xl = grad_w = grad_b = grad_a = grad_lb = None
        if need_x:
            if weight is None:  # a quantized base: dequantize again rather than keep it
                weight = ctx.dense_weight()
            grad_x = grad_y @ weight                                    # (..., in)
            if ctx.fused_x:
                _rows(grad_x).addmm_(g_h, lora_a)
        if need_xl:
            grad_xl = (g_h @ lora_a).view(*grad_y.shape[:-1], -1)       # (..., in)
        if need_w:
            grad_w = g.T @ _rows(x)                                     # (out, in)
        if need_b:
            grad_b = g.sum(0)                                           # (out,)
        if need_a:
            grad_a = g_h.T @ _rows(xl)                                  # (r, in)
        if need_lb:
            grad_lb = (g.T @ (_rows(xl) @ lora_a.T)).mul_(ctx.scaling)  # (out, r)
        return grad_x, grad_xl, grad_w, grad_b, grad_a, grad_lb, None, None


# Note: Inits that change the base
# PiSSA, OLoRA and LoRA-GA start B·A at a non-zero part of W and leave the base the residual
# W - s·B₀A₀, so the model is unchanged at step 0; LoftQ makes the base a quantized weight. The
# layer keeps what it needs to undo that and to save the adapter for the untouched base, in
# `initial_updates` (plain tensors, so state dicts and checkpoints do not change): A₀, B₀, s, and
# for a base that is not W - s·B₀A₀ (LoftQ) the original weight. Removing the adapter (delete,
# or a failed attach rolling back) puts W back. A trained adapter applies to W as
# s·(B·A - B₀·A₀) = s·[B | -B₀]·[A | A₀]: rank 2r, alpha doubled to keep s (save_adapter in
# core/io.py writes that by default; see `converted_file_tensors`).


@dataclass
class InitialUpdate:
    a: torch.Tensor                       # A₀ (r, in)
    b: torch.Tensor                       # B₀ (out, r)
    scaling: float
    original: torch.Tensor | None = None  # the base weight before, where it is not W - s·B₀A₀


class ScaledLoRALayer(AdapterLayer):
    """Keeps each adapter's scale s = α/r (or α/√r), a plain float per adapter name."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.scaling: dict[str, float] = {}

    def forget_adapter(self, name: str) -> None:
        self.scaling.pop(name, None)
        forget_stacks(self)


@routable
@implements("lora", nn.Linear, Linear4bit, *((Conv1D,) if Conv1D else ()))
class LoRALinear(ScaledLoRALayer):
    """x ↦ W₀x + s·B(A(dropout(x))) for a linear base layer (nn.Linear, Conv1D, or a frozen
    NF4 `Linear4bit`, which is QLoRA: the adapter trains in the compute dtype on top)."""

    adapter_prefixes = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        #: see Note: Inits that change the base
        self.initial_updates: dict[str, InitialUpdate] = {}

    def add_adapter(self, name: str, config: LoRAConfig, module_path: str) -> None:
        rank = config.rank_for(module_path)
        spec = get_init(config.init)
        if spec is not None and spec.needs_data:
            raise AdapterError(f"init={config.init!r} needs training batches: attach with "
                               "splice.inits.data.attach_with_data(model, config, batches) "
                               f"(`splice train --init {config.init}` draws them from the training set)")
        base = self.base_layer
        factory = ({"device": base.device, "dtype": base.compute_dtype}
                   if isinstance(base, Linear4bit) else adapter_factory(self.base_weight()))
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling_for(module_path)
        init_lora_a(self.lora_A[name].weight, config.init)
        nn.init.zeros_(self.lora_B[name].weight)
        if spec is not None:
            self.apply_init(name, spec.make(self.init_weight(config.init), rank, self.scaling[name],
                                            config.init_options))
        forget_stacks(self)

    def init_weight(self, init: str) -> torch.Tensor:
        """The base weight as an init reads it: a (out, in) fp32 copy."""
        if isinstance(self.base_layer, Linear4bit):
            raise AdapterError(
                f"init={init!r} reads the full-precision weight, and this base is already 4-bit. "
                "Attach to the full-precision model (for QLoRA with loftq: `splice train --method "
                "qlora --init loftq`, or attach, then splice.inits.loftq.quantize_adapted_bases)")
        weight = self.base_layer.weight.detach().float()
        return (weight.T if self.fan_in_fan_out else weight).clone()

    @torch.no_grad()
    def apply_init(self, name: str, init: LowRankInit) -> None:
        """Set adapter `name`'s A and B, and the base where the init changes it. See Note: Inits
        that change the base."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight     # (r, in), (out, r)
        if tuple(init.a.shape) != tuple(a.shape) or tuple(init.b.shape) != tuple(b.shape):
            raise AdapterError(f"init gave A {tuple(init.a.shape)} and B {tuple(init.b.shape)} for "
                               f"an adapter of A {tuple(a.shape)} and B {tuple(b.shape)}")
        a.copy_(init.a)
        b.copy_(init.b)
        forget_stacks(self)
        if init.base is None:
            return
        weight = self.base_layer.weight
        scaling = self.scaling[name]
        if init.residual:  # W - s·B₀A₀ with A₀, B₀ as stored (in the adapter's dtype)
            new = self.init_weight("") - scaling * (b.float() @ a.float())  # (out, in)
        else:
            new = init.base
        record = InitialUpdate(a.detach().clone(), b.detach().clone(), scaling,
                               None if init.residual else weight.data)
        # A new tensor rather than copy_: the loaded weight may be a view of a read-only file.
        weight.data = (new.T if self.fan_in_fan_out else new).to(weight.dtype).contiguous()
        self.initial_updates[name] = record

    def forget_adapter(self, name: str) -> None:
        record = self.initial_updates.pop(name, None)
        if record is not None:  # put W back: see Note: Inits that change the base
            weight = self.base_layer.weight
            if record.original is not None:
                weight.data = record.original
            else:
                delta = record.scaling * (record.b.float() @ record.a.float())  # (out, in)
                weight.data = (weight.float() + (delta.T if self.fan_in_fan_out else delta)).to(weight.dtype)
        super().forget_adapter(name)

    def converted_file_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """Adapter `name`'s file tensors for the untouched base, [A | A₀] and [B | -B₀], where its
        init left this base the residual W - s·B₀A₀; None where it did not."""
        record = self.initial_updates.get(name)
        if record is None or record.original is not None:
            return None
        a, b = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        return {"lora_A.weight": torch.cat([a, record.a.to(a.dtype)], dim=0),     # (2r, in)
                "lora_B.weight": torch.cat([b, -record.b.to(b.dtype)], dim=1)}    # (out, 2r)

    def base_weight(self) -> nn.Parameter:
        if isinstance(self.base_layer, Linear4bit):
            raise AdapterError(
                "cannot merge into an NF4 (4-bit) base in place: adding ΔW and re-quantizing "
                "loses information. Dequantize first (splice.quant.dequantize_model(model)), or "
                "export with `splice merge`, which writes a 16-bit model (or --requantize)")
        return super().base_weight()

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
        delta = (b.float() @ a.float()) * self.scaling[name]       # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        route = route_for(self)
        if route is not None:  # each row with its own adapter: see methods/lora_batched.py
            return routed_linear(self, x, route)
        names = self.adapters_to_apply()
        if len(names) == 1 and self._fusable(x, names[0]):
            name = names[0]
            x_lora = self.lora_dropout[name](x)
            base = self.base_layer
            quantized = isinstance(base, Linear4bit)
            return _LoRALinearFn.apply(x, None if x_lora is x else x_lora,
                                       None if quantized else base.weight, base.bias,
                                       self.lora_A[name].weight, self.lora_B[name].weight,
                                       self.scaling[name], base.matmul_weight if quantized else None)
        result = self.base_layer(x)
        for name in names:
            a, b = self.lora_A[name], self.lora_B[name]
            h = a(self.lora_dropout[name](x.to(a.weight.dtype)))     # (..., r)
            result = result + (b(h) * self.scaling[name]).to(result.dtype)
        return result

    def _fusable(self, x: torch.Tensor, name: str) -> bool:
        """Whether _LoRALinearFn can stand in for the plain path: a plain nn.Linear or NF4
        Linear4bit base (no hooks, no patched forward), one dtype throughout, no autocast. See
        Note: LoRA's autograd."""
        base, a, b = self.base_layer, self.lora_A[name], self.lora_B[name]
        if type(base) is nn.Linear:
            dtype = base.weight.dtype
        elif type(base) is Linear4bit:
            dtype = base.compute_dtype
        else:
            return False
        return (not base._forward_hooks and not base._forward_pre_hooks
                and "forward" not in vars(base)
                and x.dtype == dtype == a.weight.dtype == b.weight.dtype
                and not torch.is_autocast_enabled(x.device.type))


@routable
@implements("lora", nn.Embedding)
class LoRAEmbedding(ScaledLoRALayer):
    """ids ↦ E₀[ids] + s·(A[:, ids])ᵀ·Bᵀ: a low-rank update to the embedding table."""

    adapter_prefixes = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def add_adapter(self, name: str, config: LoRAConfig, module_path: str) -> None:
        rank = config.rank_for(module_path)
        weight = self.base_weight()
        num_embeddings, dim = weight.shape
        factory = adapter_factory(weight)
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(rank, num_embeddings, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, rank, **factory))
        self.scaling[name] = config.scaling_for(module_path)
        forget_stacks(self)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]  # (r, V), (d, r)
        return (b.float() @ a.float()).T * self.scaling[name]          # (V, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) integer ids -> (..., dim)."""
        route = route_for(self)
        if route is not None:
            return routed_embedding(self, ids, route)
        result = self.base_layer(ids)
        base = self.base_layer
        for name in self.adapters_to_apply():
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            h = F.embedding(ids, a.T, base.padding_idx, base.max_norm, base.norm_type,
                            base.scale_grad_by_freq, base.sparse)     # (..., r)
            result = result + (h @ b.T * self.scaling[name]).to(result.dtype)
        return result

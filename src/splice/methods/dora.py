"""DoRA (Liu et al. 2024): LoRA's update changes the direction of each weight row, and a learned
magnitude sets its length.

    W' = m ⊙ V / ‖V‖,   V = W₀ + s·B·A,   y = W'x + b₀
    m: (d_out,),   ‖V‖: (d_out,) row norms over d_in, treated as a constant in the gradient (§4.3)

m starts at W₀'s row norms and B at zero, so W' = W₀ at step 0. With c = m/‖V‖ the forward is
y = c ⊙ (W₀x + s·BAx) + b₀. Training with dropout, the adapter's paths read x' = dropout(x):
y = W₀x + b₀ + (c − 1) ⊙ W₀x' + c ⊙ s·BAx', the formula adapters in peft's format were trained
with. Several active DoRA adapters on one module each add their own W'ₖ − W₀ (every norm taken on
the unmerged W₀), so their sum does not depend on their order. File keys are LoRA's plus
`<module path>.lora_magnitude_vector`, shape (d_out,).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from splice.config.dora import DoRAConfig
from splice.config.lora import LoRAConfig
from splice.core.errors import TargetError
from splice.core.registry import MethodSpec, implements, register_method
from splice.core.targets import Conv1D
from splice.methods.lora import LoRALinear

register_method(MethodSpec(
    name="dora", config_cls=DoRAConfig, peft_type="LORA",
    matches_peft=lambda data: bool(data.get("use_dora")),
    trains="low-rank direction update B·A and a magnitude per output row", mergeable=True))

FUSABLE_BASES = (nn.Linear,) + ((Conv1D,) if Conv1D else ())


# Note: DoRA's weight norm
# ‖W₀ + s·BA‖ is needed per output row in the forward, and A and B change every training step.
# Forming W₀ + s·BA costs an (out, in) buffer and passes over it; the expanded square does not:
#     ‖V_o‖² = ‖W₀_o‖² + 2s·⟨B_o, (W₀Aᵀ)_o⟩ + s²·⟨B_o, (B·AAᵀ)_o⟩
# W₀Aᵀ is an (out, r) matmul, r/n of the base layer's forward; AAᵀ is (r, r); the sums run in
# fp32. Where the update nearly cancels a row (‖V_o‖² < 1e-3·‖W₀_o‖²) the expansion loses
# digits, so those rows are recomputed directly.
# Both ‖W₀‖² and ‖V‖ are cached, keyed by the storage and version counter of W₀ (and of A and
# B for ‖V‖): any in-place change (an optimizer step, a merge, a load) or a move to another
# device or dtype makes a new key. So ‖W₀‖² is computed once per base weight, and ‖V‖ once per
# optimizer step: evaluation, generation, gradient-accumulation micro-batches and activation
# recomputation reuse it. A tensor changed through `.data` bypasses its version counter: call
# `layer.forget_norms()` after doing that.


def row_norms(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float,
              base_sq: torch.Tensor | None = None) -> torch.Tensor:
    """‖W₀ + s·B·A‖ per row, fp32, without forming the sum. See Note: DoRA's weight norm."""
    # weight (out, in), lora_a (r, in), lora_b (out, r), base_sq (out,) = ‖W₀‖² rows -> (out,)
    if base_sq is None:
        base_sq = weight.float().pow(2).sum(1)
    a32, b32 = lora_a.float(), lora_b.float()
    cross = (weight @ lora_a.to(weight.dtype).T).float()                  # (out, r)
    square = b32 @ (a32 @ a32.T)                                          # (out, r)
    sq = base_sq + (b32 * (cross.mul_(2 * scaling) + square.mul_(scaling ** 2))).sum(1)
    shaky = sq < 1e-3 * base_sq
    if shaky.any():
        rows = shaky.nonzero().squeeze(1)
        dense = weight[rows].float() + scaling * (b32[rows] @ a32)       # (k, in)
        sq[rows] = dense.pow(2).sum(1)
    return sq.clamp_min_(0).sqrt_()


# Note: DoRA's autograd
# As with LoRA (see Note: LoRA's autograd in methods/lora.py), _DoRALinearFn runs the math of
# the plain path with few (…, out) buffers, for one adapter without dropout on a plain base:
#     forward    z = W₀x + (h Bᵀ)·s,  h = x Aᵀ;   y = c ⊙ z + b₀,   c = m / ‖V‖ (a constant)
#     backward   g_z = c ⊙ ∂y;   g_h = s·g_z B;   ∂x = g_z W₀ + g_h A
#                ∂A = g_hᵀ x;   ∂B = s·g_zᵀ h;   ∂m = Σ_rows(∂y ⊙ z) / ‖V‖;   ∂b₀ = Σ ∂y
# It keeps x and z (∂m needs z; recomputing it would cost another base matmul) and recomputes
# the small h. W₀x comes from the base layer itself (Conv1D passes Wᵀ as the (out, in) view).
# Without a bias y = c ⊙ z, which at step 0 (c = 1, B = 0) is the base output bit for bit. With
# a bias, c ⊙ z + b₀ would round differently from the base layer's own bias add, so y is formed
# as base(x) + (h Bᵀ)·s + (c − 1) ⊙ z, again exactly the base output at step 0.


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., k) -> (n, k), a view when t is contiguous."""
    return t.reshape(-1, t.shape[-1])


class _DoRALinearFn(torch.autograd.Function):
    """y = (m/‖V‖) ⊙ (W₀x + s·(x Aᵀ) Bᵀ) + b₀ with ‖V‖ given. See Note: DoRA's autograd."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, norm, scaling, base):
        # x (..., in), weight (out, in) (a transposed view for Conv1D), bias (out,) or None,
        # lora_a (r, in), lora_b (out, r), magnitude (out,), norm (out,) fp32 -> (..., out)
        scale = (magnitude.float() / norm).to(x.dtype)                    # (out,) c
        # The output buffer: first (h Bᵀ)·s, then y. A fresh tensor, not a view (a view
        # returned from a custom Function may not be modified in place afterwards).
        y = x.new_empty(*x.shape[:-1], lora_b.shape[0])                   # (..., out)
        torch.mm(_rows(x) @ lora_a.T, lora_b.T, out=_rows(y)).mul_(scaling)
        base_out = base(x)                                                # (..., out)
        if bias is None:
            z = base_out.add_(y)
            torch.mul(z, scale, out=y)
        else:
            z = (base_out - bias).add_(y)
            y.add_(base_out).addcmul_(z, scale - 1)
        need_x, need_w, _, need_a, need_lb, need_m = ctx.needs_input_grad[:6]
        ctx.save_for_backward(x if need_w or need_a or need_lb else None,
                              weight if need_x else None, lora_a, lora_b,
                              z if need_m else None, scale, norm)
        ctx.scaling = scaling
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight, lora_a, lora_b, z, scale, norm = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb, need_m = ctx.needs_input_grad[:6]
        g = _rows(grad_y)                                                 # (n, out)
        g_z = g * scale                                                   # (n, out)
        g_h = (g_z @ lora_b).mul_(ctx.scaling)                            # (n, r)
        grad_x = grad_w = grad_b = grad_a = grad_lb = grad_m = None
        if need_x:
            grad_x = (g_z @ weight).addmm_(g_h, lora_a).view(*grad_y.shape[:-1], -1)
        if need_w:
            grad_w = g_z.T @ _rows(x)                                     # (out, in)
        if need_b:
            grad_b = g.sum(0)                                             # (out,)
        if need_a:
            grad_a = g_h.T @ _rows(x)                                     # (r, in)
        if need_lb:
            grad_lb = (g_z.T @ (_rows(x) @ lora_a.T)).mul_(ctx.scaling)   # (out, r)
        if need_m:
            grad_m = torch.linalg.vecdot(g, _rows(z), dim=0).float() / norm  # (out,)
        return grad_x, grad_w, grad_b, grad_a, grad_lb, grad_m, None, None, None


@implements("dora", nn.Linear, *((Conv1D,) if Conv1D else ()))
class DoRALinear(LoRALinear):
    """x ↦ m ⊙ (W₀ + s·BA)x / ‖W₀ + s·BA‖ + b₀ for nn.Linear and GPT-2's Conv1D."""

    adapter_prefixes = LoRALinear.adapter_prefixes + ("lora_magnitude_vector",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()
        #: c = m/‖V‖ of each merged adapter, frozen at merge time so unmerge inverts it exactly
        self.merge_scales: dict[str, torch.Tensor] = {}
        #: cached ‖W₀‖² rows (key "base") and ‖V‖ per adapter, see Note: DoRA's weight norm
        self._norms: dict[str, tuple[tuple, torch.Tensor]] = {}

    def add_adapter(self, name: str, config: LoRAConfig, module_path: str) -> None:
        if not isinstance(config, DoRAConfig):
            raise TargetError(f"{module_path} already carries a DoRA adapter; one method per "
                              "module: target other modules or delete the DoRA adapter first")
        super().add_adapter(name, config, module_path)
        with torch.no_grad():
            norm = self.weight_norm(name, self.unmerged_weight())         # (out,) = ‖W₀‖ rows
        weight = self.lora_A[name].weight
        self.lora_magnitude_vector[name] = nn.Parameter(norm.to(weight.dtype))

    def forget_adapter(self, name: str) -> None:
        super().forget_adapter(name)
        self.merge_scales.pop(name, None)
        self._norms.pop(f"adapter:{name}", None)

    def forget_norms(self) -> None:
        """Drop the cached norms. See Note: DoRA's weight norm."""
        self._norms.clear()

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() may give a tensor a storage another one had: start afresh.
        self.forget_norms()
        return super()._apply(fn, recurse)

    # -- the norm ---------------------------------------------------------------------------
    def unmerged_weight(self) -> torch.Tensor:
        """W₀ as (out, in), detached: the base weight itself, or recovered while merged."""
        weight = self.base_layer.weight.detach()
        weight = weight.T if self.fan_in_fan_out else weight
        if not self.merged_adapters:
            return weight
        return self._recover_base(weight.float(), self.merged_adapters).to(weight.dtype)

    def _cached(self, slot: str, key: tuple | None, compute) -> torch.Tensor:
        """compute(), remembered under `slot` for as long as `key` holds (None: not cached)."""
        if key is None:
            return compute()
        hit = self._norms.get(slot)
        if hit is None or hit[0] != key:
            hit = self._norms[slot] = (key, compute())
        return hit[1]

    def _tensor_keys(self, *tensors: torch.Tensor) -> tuple | None:
        """Identity + version of each tensor; None (do not cache) while merged (W₀ is then
        recomputed, not the live weight), for inference-mode tensors (no version counter), and
        under inference mode (its results may not be saved for a later backward)."""
        if (self.merged_adapters or torch.is_inference_mode_enabled()
                or any(t.is_inference() for t in tensors)):
            return None
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)

    @torch.no_grad()
    def weight_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """‖W₀ + s·BA‖ per row (out,), rounded to the adapter's dtype (m's), held as fp32.
        `weight` is W₀ as (out, in). See Note: DoRA's weight norm."""
        a, b, scaling = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        live = self.base_layer.weight
        base_key = self._tensor_keys(live)
        adapter_key = self._tensor_keys(live, a, b)

        def compute() -> torch.Tensor:
            base_sq = self._cached("base", base_key, lambda: weight.float().pow(2).sum(1))
            # Rounded like m is stored, so that c = m/‖V‖ is exactly 1 at step 0 in any dtype.
            return row_norms(weight, a, b, scaling, base_sq).to(a.dtype).float()

        key = None if adapter_key is None else adapter_key + (scaling,)
        return self._cached(f"adapter:{name}", key, compute)

    # -- merging ----------------------------------------------------------------------------
    def _lora_delta(self, name: str) -> torch.Tensor:
        """s·B·A as fp32 (out, in)."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        return (b.detach().float() @ a.detach().float()) * self.scaling[name]

    def _compose(self, base: torch.Tensor, names: list[str]) -> torch.Tensor:
        """W₀ + Σₖ (W'ₖ − W₀) = W₀ ⊙ (Σₖ cₖ − (K − 1)) + Σₖ cₖ ⊙ s·BₖAₖ, fp32 (out, in)."""
        if not names:
            return base
        scales = [self.merge_scales[n].to(base.device)[:, None] for n in names]  # (out, 1) each
        out = base * (sum(scales) - (len(names) - 1))
        for name, scale in zip(names, scales):
            out += scale * self._lora_delta(name)
        return out

    def _recover_base(self, weight: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The inverse of `_compose`: W₀ from the weight with `names` merged in."""
        if not names:
            return weight
        scales = [self.merge_scales[n].to(weight.device)[:, None] for n in names]
        rest = weight.clone()
        for name, scale in zip(names, scales):
            rest -= scale * self._lora_delta(name)
        return rest / (sum(scales) - (len(names) - 1))

    def fold_into(self, weight: torch.Tensor, name: str, sign: int) -> torch.Tensor:
        """The weight with adapter `name` merged in (W₀ → W', sign=+1) or taken out (sign=-1).
        Merging freezes c = m/‖V‖ in `merge_scales`; unmerging divides by that same c."""
        w = weight.detach().float()
        w = w.T if self.fan_in_fan_out else w                             # (out, in)
        others = [n for n in self.merged_adapters if n != name]
        if sign > 0:
            base = self._recover_base(w, others)
            norm = torch.linalg.vector_norm(base + self._lora_delta(name), dim=1)  # (out,)
            norm = norm.to(self.lora_magnitude_vector[name].dtype).float()  # as in forward
            self.merge_scales[name] = self.lora_magnitude_vector[name].detach().float() / norm
            new = self._compose(base, others + [name])
        else:
            new = self._compose(self._recover_base(w, others + [name]), others)
            del self.merge_scales[name]
        return (new.T if self.fan_in_fan_out else new).to(weight.dtype)

    @torch.no_grad()
    def delta_weight(self, name: str) -> torch.Tensor:
        """W' − W₀ = (c − 1) ⊙ W₀ + c ⊙ s·BA in the base weight's layout (DoRA is not additive in
        B·A; merging goes through `fold_into`)."""
        weight = self.unmerged_weight()
        scale = self.scale(name, weight)[:, None]                         # (out, 1)
        delta = (scale - 1) * weight.float() + scale * self._lora_delta(name)
        return delta.T if self.fan_in_fan_out else delta

    # -- forward ----------------------------------------------------------------------------
    def scale(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """c = m / ‖W₀ + s·BA‖ (out,), differentiable in m only."""
        return self.lora_magnitude_vector[name].float() / self.weight_norm(name, base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        names = self.adapters_to_apply()
        if not names:
            return self.base_layer(x)
        if len(names) == 1 and self._fusable(x, names[0]):
            name, base = names[0], self.base_layer
            weight = base.weight.T if self.fan_in_fan_out else base.weight
            norm = self.weight_norm(name, weight.detach())
            return _DoRALinearFn.apply(x, weight, base.bias, self.lora_A[name].weight,
                                       self.lora_B[name].weight, self.lora_magnitude_vector[name],
                                       norm, self.scaling[name], base)
        return self._forward_plain(x, names)

    def _forward_plain(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        result = self.base_layer(x)                                       # (..., out)
        weight = self.unmerged_weight()                                   # (out, in)
        bias = self.base_layer.bias
        plain_base = result if bias is None else result - bias            # W₀x, when unmerged
        for name in names:
            a, b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            xa = x.to(a.weight.dtype)
            scale = self.scale(name, weight).to(xa.dtype)                 # (out,)
            dropping = not isinstance(dropout, nn.Identity) and dropout.training
            if not dropping and not self.merged_adapters:
                base_out = plain_base
            else:
                xa = dropout(xa)
                base_out = F.linear(xa, weight.to(xa.dtype))              # W₀x'
            delta = (scale - 1) * base_out + scale * b(a(xa)) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def _fusable(self, x: torch.Tensor, name: str) -> bool:
        """Whether _DoRALinearFn can stand in for the plain path: one dtype throughout, a plain
        nn.Linear / Conv1D base (no hooks, no patched forward), no dropout in training, nothing
        merged, no autocast. See Note: DoRA's autograd."""
        base, dropout = self.base_layer, self.lora_dropout[name]
        tensors = (base.weight, self.lora_A[name].weight, self.lora_B[name].weight,
                   self.lora_magnitude_vector[name])
        return (type(base) in FUSABLE_BASES and not base._forward_hooks
                and not base._forward_pre_hooks and "forward" not in vars(base)
                and not self.merged_adapters
                and (isinstance(dropout, nn.Identity) or not dropout.training)
                and all(t.dtype == x.dtype for t in tensors)
                and not torch.is_autocast_enabled(x.device.type))

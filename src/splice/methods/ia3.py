"""IA³ (Liu et al. 2022): a frozen base whose activations are rescaled by learned vectors.

    ordinary module       y = l ⊙ (W₀x + b₀),   l: (d_out, 1)   ≡  W = diag(l)·W₀, b = l ⊙ b₀
    feed-forward module   y = W₀(l ⊙ x) + b₀,   l: (1, d_in)    ≡  W = W₀·diag(l), b = b₀

l starts at ones, so the adapted model equals the base model at step 0. With several active
adapters their vectors multiply. File keys are peft's: `<module path>.ia3_l`.
"""

from __future__ import annotations

import torch
from torch import nn

from splice.config.ia3 import IA3Config
from splice.core.layer import AdapterLayer
from splice.core.registry import MethodSpec, implements, register_method
from splice.core.targets import Conv1D
from splice.methods.lora import adapter_factory, linear_shape

register_method(MethodSpec(
    name="ia3", config_cls=IA3Config, peft_type="IA3",
    trains="a scaling vector per module (its outputs; its inputs if feed-forward)", mergeable=True))


# Note: IA³ merge and the bias
# An ordinary module's vector scales its whole output, bias included, so merging it rescales
# both W₀'s rows (fold_into) and b₀ (fold_bias_into). A feed-forward module's vector acts before
# W₀, so its bias is untouched. Unmerging divides; a trained vector with an exact zero makes the
# merge irreversible.


@implements("ia3", nn.Linear, *((Conv1D,) if Conv1D else ()))
class IA3Linear(AdapterLayer):
    """x ↦ l ⊙ (W₀x + b₀), or x ↦ W₀(l ⊙ x) + b₀ for a feed-forward module (nn.Linear or Conv1D)."""

    adapter_prefixes = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}

    def add_adapter(self, name: str, config: IA3Config, module_path: str) -> None:
        feedforward = config.is_feedforward(module_path)
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        factory = adapter_factory(self.base_weight())
        vector = torch.ones(shape, **factory) if config.init_ones else torch.randn(shape, **factory)
        self.ia3_l[name] = nn.Parameter(vector)
        self.feedforward[name] = feedforward

    def forget_adapter(self, name: str) -> None:
        self.feedforward.pop(name, None)

    def fold_into(self, weight: torch.Tensor, name: str, sign: int) -> torch.Tensor:
        """W₀ with the vector multiplied in (sign=+1) or divided out (sign=-1). See Note: IA³
        merge and the bias."""
        vector = self.ia3_l[name].detach().to(torch.float32)      # (out, 1) or (1, in)
        scale = vector.T if self.fan_in_fan_out else vector       # broadcasts over W's layout
        w32 = weight.to(torch.float32)
        return (w32 * scale if sign > 0 else w32 / scale).to(weight.dtype)

    def fold_bias_into(self, bias: torch.Tensor, name: str, sign: int) -> torch.Tensor:
        """b₀ rescaled by an ordinary module's vector; a feed-forward module's bias stays."""
        if self.feedforward[name]:
            return bias
        flat = self.ia3_l[name].detach().to(torch.float32).flatten()  # (out,)
        b32 = bias.to(torch.float32)
        return (b32 * flat if sign > 0 else b32 / flat).to(bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        names = self.adapters_to_apply()
        if not names:
            return self.base_layer(x)
        # Two adapters' configs may disagree on whether this module is feed-forward, so each
        # side multiplies its own vectors; the product runs in the vectors' dtype.
        input_side = [n for n in names if self.feedforward[n]]
        output_side = [n for n in names if not self.feedforward[n]]
        if input_side:
            scale = self.product(input_side)                      # (in,)
            x = (x.to(scale.dtype) * scale).to(x.dtype)           # (..., in)
        result = self.base_layer(x)                               # (..., out)
        if output_side:
            scale = self.product(output_side)                     # (out,)
            result = (result * scale).to(result.dtype)
        return result

    def product(self, names: list[str]) -> torch.Tensor:
        scale = self.ia3_l[names[0]].flatten()
        for name in names[1:]:
            scale = scale * self.ia3_l[name].flatten()
        return scale

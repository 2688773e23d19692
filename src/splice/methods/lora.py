"""LoRA (Hu et al. 2021): a frozen base plus a trainable low-rank update.

    y = W₀x + s·B·A·dropout(x),   A: (r, d_in), B: (d_out, r),   s = α/r  (α/√r with rsLoRA)

A starts kaiming-uniform (a=√5) or Gaussian N(0, 1/r); B starts at zero, so ΔW = s·B·A = 0 and the
adapted model equals the base model at step 0. For embeddings the roles swap (A = 0, B ~ N(0, 1)),
because an embedding's "input" is a one-hot row: ΔE = s·(B·A)ᵀ, shape (num_embeddings, dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from splice.config.lora import LoRAConfig
from splice.core.layer import AdapterLayer
from splice.core.registry import MethodSpec, implements, register_method
from splice.core.targets import Conv1D

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


def init_lora_a(weight: torch.Tensor, init: str) -> None:
    if init == "gaussian":
        nn.init.normal_(weight, std=1.0 / weight.shape[0])
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


@implements("lora", nn.Linear, *((Conv1D,) if Conv1D else ()))
class LoRALinear(AdapterLayer):
    """x ↦ W₀x + s·B(A(dropout(x))) for a linear base layer (nn.Linear or Conv1D)."""

    adapter_prefixes = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: LoRAConfig, module_path: str) -> None:
        rank = config.rank_for(module_path)
        weight = self.base_weight()
        factory = {"device": weight.device, "dtype": torch.float32 if not weight.is_floating_point() else weight.dtype}
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, **factory)
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling_for(module_path)
        init_lora_a(self.lora_A[name].weight, config.init)
        nn.init.zeros_(self.lora_B[name].weight)

    def forget_adapter(self, name: str) -> None:
        self.scaling.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
        delta = (b.float() @ a.float()) * self.scaling[name]       # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features)."""
        result = self.base_layer(x)
        for name in self.adapters_to_apply():
            a, b = self.lora_A[name], self.lora_B[name]
            h = a(self.lora_dropout[name](x.to(a.weight.dtype)))     # (..., r)
            result = result + (b(h) * self.scaling[name]).to(result.dtype)
        return result


@implements("lora", nn.Embedding)
class LoRAEmbedding(AdapterLayer):
    """ids ↦ E₀[ids] + s·(A[:, ids])ᵀ·Bᵀ: a low-rank update to the embedding table."""

    adapter_prefixes = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    def add_adapter(self, name: str, config: LoRAConfig, module_path: str) -> None:
        rank = config.rank_for(module_path)
        weight = self.base_weight()
        num_embeddings, dim = weight.shape
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(rank, num_embeddings, **factory))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, rank, **factory))
        self.scaling[name] = config.scaling_for(module_path)

    def forget_adapter(self, name: str) -> None:
        self.scaling.pop(name, None)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]  # (r, V), (d, r)
        return (b.float() @ a.float()).T * self.scaling[name]          # (V, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) integer ids -> (..., dim)."""
        result = self.base_layer(ids)
        base = self.base_layer
        for name in self.adapters_to_apply():
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            h = F.embedding(ids, a.T, base.padding_idx, base.max_norm, base.norm_type,
                            base.scale_grad_by_freq, base.sparse)     # (..., r)
            result = result + (h @ b.T * self.scaling[name]).to(result.dtype)
        return result

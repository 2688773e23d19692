"""DoRA's configuration (Liu et al. 2024): LoRA's fields; the magnitude vector needs none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from splice.config.lora import LoRAConfig


@dataclass(frozen=True)
class DoRAConfig(LoRAConfig):
    """W' = m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖, the norm per output row (over the input dimension)
    and held constant in the gradient; m: (out,) starts at W₀'s row norms and B at zero, so the
    adapted model equals the base model at step 0. rank, alpha, dropout, init and the patterns
    mean what they mean for LoRA. On file it is peft's LoRA format with `use_dora: true` and a
    `lora_magnitude_vector` tensor per module."""

    method: ClassVar[str] = "dora"
    # Every DoRA file says use_dora: true; it is what routes the file here, not a setting.
    ignored_peft_keys: ClassVar[frozenset[str]] = LoRAConfig.ignored_peft_keys | {"use_dora"}

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        out["use_dora"] = True
        return out

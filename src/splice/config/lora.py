"""LoRA's configuration (Hu et al. 2021), with rsLoRA scaling (Kalajdzievski 2023)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from splice.config.base import AdapterConfig, ConfigError, doc

LORA_INITS = ("default", "gaussian")
BIAS_MODES = ("none", "all", "lora_only")


def pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first pattern that matches the end of a dotted module path.

    A pattern matches `model.layers.0.self_attn.q_proj` when it is the whole path or a suffix
    after a dot (`q_proj`, `self_attn.q_proj`, `layers.0.self_attn.q_proj`); regex syntax works.
    This is the rule peft applies to `rank_pattern` / `alpha_pattern`, so files agree.
    """
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """y = W₀x + s·B·A·dropout(x), A: (rank, in), B: (out, rank), s = alpha/rank (alpha/√rank with
    rsLoRA). B starts at zero, so the adapted model equals the base model at step 0."""

    method: ClassVar[str] = "lora"
    peft_type: ClassVar[str] = "LORA"
    peft_key_map: ClassVar[Mapping[str, str]] = {
        "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "init": "init_lora_weights"}
    # peft writes qalora_group_size (default 16) into every LoRA config, even with use_qalora off;
    # warning about it would warn on every peft-made file. use_qalora=true still warns.
    ignored_peft_keys: ClassVar[frozenset[str]] = (AdapterConfig.ignored_peft_keys
                                                   | {"qalora_group_size"})

    rank: int = doc("Rank r of the update B·A.", default=8)
    alpha: float | None = doc(
        "Scale numerator: the update is multiplied by alpha/rank (alpha/sqrt(rank) with rsLoRA). "
        "Default: 2 x rank (the common choice; it also gives fewer intruder dimensions than a "
        "fixed alpha).", default=None)
    dropout: float = doc("Dropout probability on the adapter's input during training.", default=0.0)
    use_rslora: bool = doc("Scale by alpha/sqrt(rank) instead of alpha/rank (rank-stabilised LoRA).",
                           default=False)
    init: str = doc("Initialisation of A: 'default' (kaiming-uniform, a=sqrt(5)) or 'gaussian' "
                    "(N(0, 1/rank)); B is zero either way.", default="default")
    bias: str = doc("Which biases train and are saved: 'none', 'all' or 'lora_only'.", default="none")
    rank_pattern: Mapping[str, int] = doc("Per-module rank overrides: {pattern: rank}.",
                                          default_factory=dict)
    alpha_pattern: Mapping[str, float] = doc("Per-module alpha overrides: {pattern: alpha}.",
                                             default_factory=dict)
    fan_in_fan_out: bool = doc("The base weight is stored (in, out) (GPT-2 Conv1D); detected "
                               "automatically on attach, recorded for peft.", default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_rank("rank", self.rank)
        if self.alpha is None:
            object.__setattr__(self, "alpha", 2 * self.rank)
        self._check_alpha("alpha", self.alpha)
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r}: give a probability in [0, 1)")
        if self.init not in LORA_INITS:
            raise ConfigError(f"init={self.init!r}: choose one of {', '.join(LORA_INITS)}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias={self.bias!r}: choose one of {', '.join(BIAS_MODES)}")
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        for key, value in self.rank_pattern.items():
            self._check_rank(f"rank_pattern[{key!r}]", value)
        for key, value in self.alpha_pattern.items():
            self._check_alpha(f"alpha_pattern[{key!r}]", value)

    @staticmethod
    def _check_rank(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r}: the rank must be a positive integer (e.g. 8)")

    @staticmethod
    def _check_alpha(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value!r}: alpha must be a positive finite number "
                              "(leave it unset for 2 x rank)")

    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.rank)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.alpha)

    def scaling_for(self, module_name: str) -> float:
        rank, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    # -- peft file boundary -------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        out["init_lora_weights"] = True if self.init == "default" else self.init
        out["use_dora"] = False
        return out

    @classmethod
    def adapt_peft_values(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        init = kwargs.get("init", "default")
        if init is True or init is False:
            kwargs["init"] = "default"
        elif isinstance(init, str) and init not in LORA_INITS:
            # A file made with a data-aware init holds trained weights; the init no longer matters.
            kwargs["init"] = "default"
        return kwargs

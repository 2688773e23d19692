"""LoRA's configuration (Hu et al. 2021), with rsLoRA scaling (Kalajdzievski 2023)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from splice.config.base import AdapterConfig, ConfigError, doc

# The names splice.inits registers (a test checks the two agree; configs do not import torch).
# pissa, olora and lora_ga move the start of the update into the base weight (the base becomes a
# residual); loftq makes the base a quantized weight; eva and lora_ga need training batches.
LORA_INITS = ("default", "gaussian", "pissa", "olora", "loftq", "eva", "lora_ga")
DATA_INITS = ("eva", "lora_ga")
LOFTQ_BITS = (4, 8)
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
class InitOptions:
    """Settings of the non-default initialisations; each init reads only its own fields."""

    pissa_niter: int | None = doc(
        "pissa: None for an exact SVD of each weight; K for a randomized SVD with K subspace "
        "iterations (much faster on large weights, close to exact for K >= 4).", default=None)
    loftq_bits: int = doc("loftq: 4 (NF4, blocks of 64 with double quantization, as a 4-bit base "
                          "stores it) or 8 (int8, one absmax per row).", default=4)
    loftq_iterations: int = doc("loftq: alternations of quantizing and low-rank fitting.", default=1)
    eva_rho: float = doc("eva: a layer may take up to rho x rank components when ranks are "
                         "redistributed (1.0: no redistribution).", default=2.0)
    lora_ga_gamma: float = doc("lora_ga: gamma of the stable scale d_out^(1/4)/sqrt(gamma) applied "
                               "to A and B.", default=16.0)

    def __post_init__(self) -> None:
        if self.pissa_niter is not None and (isinstance(self.pissa_niter, bool) or not isinstance(
                self.pissa_niter, int) or self.pissa_niter < 0):
            raise ConfigError(f"init_options.pissa_niter={self.pissa_niter!r}: give a non-negative "
                              "integer (e.g. 4), or None for an exact SVD")
        if self.loftq_bits not in LOFTQ_BITS:
            raise ConfigError(f"init_options.loftq_bits={self.loftq_bits!r}: choose 4 (NF4) or 8 (int8)")
        if isinstance(self.loftq_iterations, bool) or not isinstance(
                self.loftq_iterations, int) or self.loftq_iterations < 1:
            raise ConfigError(f"init_options.loftq_iterations={self.loftq_iterations!r}: give a "
                              "positive integer (1 is LoftQ's usual)")
        if not isinstance(self.eva_rho, (int, float)) or not 1.0 <= self.eva_rho < math.inf:
            raise ConfigError(f"init_options.eva_rho={self.eva_rho!r}: give a number >= 1 "
                              "(1.0 keeps every layer at its rank)")
        if not isinstance(self.lora_ga_gamma, (int, float)) or not 0 < self.lora_ga_gamma < math.inf:
            raise ConfigError(f"init_options.lora_ga_gamma={self.lora_ga_gamma!r}: give a "
                              "positive number (16 is the paper's)")

    @classmethod
    def coerce(cls, value: Any) -> "InitOptions":
        if isinstance(value, cls):
            return value
        if value is None:
            return cls()
        if not isinstance(value, Mapping):
            raise ConfigError(f"init_options={value!r}: give a mapping such as {{'loftq_bits': 4}}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"init_options has unknown key(s) {unknown}; known: {', '.join(sorted(names))}")
        return cls(**value)


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
    # The init's own settings (loftq_config and the like) do not matter once the values exist.
    ignored_peft_keys: ClassVar[frozenset[str]] = (AdapterConfig.ignored_peft_keys
                                                   | {"qalora_group_size", "loftq_config",
                                                      "eva_config", "lora_ga_config", "corda_config"})

    rank: int = doc("Rank r of the update B·A.", default=8)
    alpha: float | None = doc(
        "Scale numerator: the update is multiplied by alpha/rank (alpha/sqrt(rank) with rsLoRA). "
        "Default: 2 x rank (the common choice; it also gives fewer intruder dimensions than a "
        "fixed alpha).", default=None)
    dropout: float = doc("Dropout probability on the adapter's input during training.", default=0.0)
    use_rslora: bool = doc("Scale by alpha/sqrt(rank) instead of alpha/rank (rank-stabilised LoRA).",
                           default=False)
    init: str = doc(
        "Initialisation: 'default' (A kaiming-uniform, a=sqrt(5)) or 'gaussian' (A ~ N(0, 1/rank)) "
        "with B = 0; 'pissa' (top singular triplets of W; the base keeps the rest), 'olora' (QR "
        "of W; the base keeps the rest), 'loftq' (the base becomes a quantized weight and B·A "
        "fits the error), 'eva' (A from the principal directions of the layer inputs, ranks "
        "redistributed; needs data), 'lora_ga' (A, B from the SVD of the full gradient; the base "
        "keeps the rest; needs data). See splice.inits.", default="default")
    init_options: InitOptions = doc("Settings of the non-default inits (pissa_niter, loftq_bits, "
                                    "loftq_iterations, eva_rho, lora_ga_gamma).",
                                    default_factory=InitOptions)
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
        object.__setattr__(self, "init_options", InitOptions.coerce(self.init_options))
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
        out.pop("init_options")
        out["init_lora_weights"] = self.peft_init_value()
        if self.init == "loftq":
            out["loftq_config"] = {"loftq_bits": self.init_options.loftq_bits,
                                   "loftq_iter": self.init_options.loftq_iterations}
        out["use_dora"] = False
        return out

    def peft_init_value(self) -> bool | str:
        """`init_lora_weights` as peft spells it. A data-aware init's file holds the values it
        started from, and loading it needs no data, so it is written as a plain init."""
        if self.init == "default" or self.init in DATA_INITS:
            return True
        if self.init == "pissa" and self.init_options.pissa_niter is not None:
            return f"pissa_niter_{self.init_options.pissa_niter}"
        return self.init

    def converted_to_plain(self) -> "LoRAConfig":
        """The config of this adapter saved for the untouched base: the trained update minus the
        initial one, [A | A₀] and [B | -B₀], so every rank doubles and, to keep s, so does alpha
        (x sqrt(2) under rsLoRA, where s = alpha/sqrt(rank))."""
        factor = math.sqrt(2) if self.use_rslora else 2
        return dataclasses.replace(
            self, init="default", init_options=InitOptions(), rank=2 * self.rank,
            alpha=factor * self.alpha,
            rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()},
            alpha_pattern={k: factor * v for k, v in self.alpha_pattern.items()})

    @classmethod
    def adapt_peft_values(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # A file holds the adapter's values: loading never re-runs an init (no SVD, no data). An
        # adapter whose init changed the base is saved converted to apply to the untouched base
        # (splice.core.io.save_adapter), so its file reads as a plain LoRA.
        init = kwargs.get("init", "default")
        if init is True or init is False or (isinstance(init, str) and init != "gaussian"):
            kwargs["init"] = "default"
        return kwargs

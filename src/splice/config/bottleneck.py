"""Bottleneck adapters' configuration (Houlsby et al. 2019; Pfeiffer et al. 2021): a small MLP
with a residual after chosen sub-layer outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

from splice.config.base import AdapterConfig, ConfigError, doc

ACTIVATIONS = ("relu", "gelu", "silu")

# Per placement and model family, the modules whose output the adapter follows. The default
# targets are the union over families: each family's names match nothing in the other.
PLACEMENT_TARGETS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    # after the attention output projection and after the MLP: two adapters per block
    "houlsby": {"llama": ("o_proj", "down_proj"), "gpt2": ("attn.c_proj", "mlp.c_proj")},
    # after the MLP only
    "pfeiffer": {"llama": ("down_proj",), "gpt2": ("mlp.c_proj",)},
}


def default_targets(placement: str) -> tuple[str, ...]:
    return tuple(n for names in PLACEMENT_TARGETS[placement].values() for n in names)


@dataclass(frozen=True)
class BottleneckConfig(AdapterConfig):
    """h ↦ h + W_up·act(W_down·dropout(h) + b_down) + b_up after each target module's output h,
    W_down: (bottleneck_size, d), W_up: (d, bottleneck_size). W_up and b_up start at zero, so the
    adapted model equals the base model at step 0."""

    method: ClassVar[str] = "adapter"
    peft_type: ClassVar[str] = "SPLICE_BOTTLENECK"

    placement: str = doc(
        "Where adapters go when target_modules is not given: 'houlsby' (after the attention output "
        "projection and after the MLP, two per block) or 'pfeiffer' (after the MLP only).",
        default="houlsby")
    target_modules: tuple[str, ...] | str | None = doc(
        "Modules whose output the adapter follows: a list of names (a module matches when its "
        "dotted path equals a name or ends with '.name'), a regex matched against the whole path, "
        "or 'all-linear'. Default: from the placement, for Llama-family models (o_proj, "
        "down_proj) and GPT-2 (attn.c_proj, mlp.c_proj).", default=None)
    bottleneck_size: int = doc("Width m of the bottleneck (hidden d -> m -> d).", default=64)
    activation: str = doc(f"Nonlinearity between the projections: {', '.join(ACTIVATIONS)}.",
                          default="relu")
    dropout: float = doc("Dropout probability on the adapter's input during training.", default=0.0)

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENT_TARGETS:
            raise ConfigError(f"placement={self.placement!r}: choose one of "
                              f"{', '.join(PLACEMENT_TARGETS)} (or give target_modules)")
        if self.target_modules is None:
            object.__setattr__(self, "target_modules", default_targets(self.placement))
        super().__post_init__()
        size = self.bottleneck_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"bottleneck_size={size!r}: give a positive integer (e.g. 64)")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation={self.activation!r}: choose one of "
                              f"{', '.join(ACTIVATIONS)}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout!r}: give a probability in [0, 1)")

"""Prefix tuning's configuration (Li & Liang 2021)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from splice.config.base import ConfigError, doc
from splice.config.prompt import VirtualTokenConfig, check_positive

PREFIX_INITS = ("random", "zero", "text")


@dataclass(frozen=True)
class PrefixTuningConfig(VirtualTokenConfig):
    """Every attention layer ℓ also attends to num_virtual_tokens trained key/value pairs
    (K_ℓ, V_ℓ), each (num_virtual_tokens, token_dim): softmax(q·[K_ℓ ; K]ᵀ/√d)·[V_ℓ ; V]. With
    prefix_projection the prefix is MLP(E), E (num_virtual_tokens, token_dim), the MLP
    token_dim → encoder_hidden_size → tanh → num_layers·2·token_dim (the paper's
    reparameterisation). token_dim here is the width of one layer's keys (kv heads × head dim).
    Not zero-effect at step 0: see splice.methods.prefix for what holds."""

    method: ClassVar[str] = "prefix"
    peft_type: ClassVar[str] = "PREFIX_TUNING"
    peft_key_map: ClassVar[Mapping[str, str]] = {"init": "init_weights"}

    init: str = doc("Start of the prefix: 'random' (N(0, 1) entries), 'zero' (keys and values 0; "
                    "with prefix_projection the MLP's output layer is 0) or 'text' (the keys and "
                    "values the model computes for init_text's tokens; no prefix_projection).",
                    default="random")
    prefix_projection: bool = doc("Train the prefix through an MLP (E -> tanh MLP -> keys and "
                                  "values) instead of directly.", default=False)
    encoder_hidden_size: int | None = doc("Hidden width of the prefix_projection MLP; default: "
                                          "token_dim.", default=None)

    def __post_init__(self) -> None:
        if self.init not in PREFIX_INITS:
            raise ConfigError(f"init={self.init!r}: choose one of {', '.join(PREFIX_INITS)}")
        super().__post_init__()
        if self.init == "text" and self.prefix_projection:
            raise ConfigError("init='text' sets the keys and values directly, which a "
                              "prefix_projection MLP cannot express; drop one of the two")
        if self.encoder_hidden_size is not None:
            check_positive("encoder_hidden_size", self.encoder_hidden_size)

    # -- peft file boundary -------------------------------------------------------------------
    # The init text is splice's own option: the file records only what its format knows.
    splice_only_fields: ClassVar[tuple[str, ...]] = ("init_text", "tokenizer_name_or_path")

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        for name in self.splice_only_fields:
            out.pop(name)
        out["init_weights"] = "zero" if self.init == "zero" else None
        return out

    @classmethod
    def adapt_peft_values(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # The file's init_weights is "zero" or null; a file's other inits are not re-run on load.
        kwargs["init"] = "zero" if kwargs.get("init") == "zero" else "random"
        return kwargs

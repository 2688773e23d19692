"""Prompt tuning's configuration (Lester et al. 2021), and the fields every virtual-token method
shares with it (prefix tuning's config builds on `VirtualTokenConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from splice.config.base import AdapterConfig, ConfigError, doc

PROMPT_INITS = ("random", "text", "sample_vocab")

#: fields the method derives from the model on attach (the file records them, the user need not)
MODEL_FIELDS = ("token_dim", "num_layers", "num_attention_heads", "num_transformer_submodules")


@dataclass(frozen=True)
class VirtualTokenConfig(AdapterConfig):
    """What prompt and prefix tuning share: a number of virtual tokens, an optional init text,
    and the model dimensions their file records. They adapt no module: target_modules,
    layers_to_transform and layers_pattern stay unset (modules_to_save still works)."""

    num_virtual_tokens: int = doc("Number of virtual tokens (trained positions) put before the input.",
                                  default=20)
    init_text: str | None = doc(
        "Text whose tokens start the virtual tokens (init 'text'): its tokens, cut or repeated to "
        "num_virtual_tokens.", default=None)
    tokenizer_name_or_path: str | None = doc(
        "Tokenizer folder (or hub name) that tokenizes init_text.", default=None)
    token_dim: int | None = doc("Width of one virtual token; derived from the model on attach.",
                                default=None)
    num_layers: int | None = doc("Transformer layers of the model; derived on attach.", default=None)
    num_attention_heads: int | None = doc("Attention heads the file records; derived on attach.",
                                          default=None)
    num_transformer_submodules: int | None = doc(
        "1 for decoder-only models (the only kind supported); derived on attach.", default=None)

    #: AdapterConfig fields that have no meaning here and no key in the file
    unused_fields: ClassVar[tuple[str, ...]] = ("target_modules", "layers_to_transform",
                                                "layers_pattern")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in self.unused_fields:
            if getattr(self, name) is not None:
                raise ConfigError(f"{name}={getattr(self, name)!r}: {self.method} tuning adapts no "
                                  "module (it changes the model's input); leave it unset")
        check_positive("num_virtual_tokens", self.num_virtual_tokens)
        for name in MODEL_FIELDS:
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if self.num_transformer_submodules not in (None, 1):
            raise ConfigError(f"num_transformer_submodules={self.num_transformer_submodules}: only "
                              "decoder-only models (1) are supported, not encoder-decoder ones")
        needs_text = getattr(self, "init", None) == "text"
        if needs_text and not (self.init_text and self.tokenizer_name_or_path):
            raise ConfigError("init='text' needs init_text and tokenizer_name_or_path (the tokenizer "
                              "folder of the model), e.g. init_text='Classify the sentiment:'")

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        for name in self.unused_fields:
            out.pop(name)
        return out


def check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: give a positive integer")


@dataclass(frozen=True)
class PromptTuningConfig(VirtualTokenConfig):
    """h = [P ; E(x)]: num_virtual_tokens trained embeddings P (num_virtual_tokens, token_dim) go
    before the embedded input; the model is frozen. Not zero-effect at step 0: the virtual tokens
    are attended to from the start (init 'text' starts as the base model reading that text)."""

    method: ClassVar[str] = "prompt"
    peft_type: ClassVar[str] = "PROMPT_TUNING"
    peft_key_map: ClassVar[Mapping[str, str]] = {
        "init": "prompt_tuning_init", "init_text": "prompt_tuning_init_text"}

    init: str = doc("Start of the virtual tokens: 'random' (N(0, 1) entries), 'text' (the "
                    "embeddings of init_text's tokens) or 'sample_vocab' (embeddings of random "
                    "vocabulary tokens).", default="random")

    def __post_init__(self) -> None:
        if self.init not in PROMPT_INITS:
            raise ConfigError(f"init={self.init!r}: choose one of {', '.join(PROMPT_INITS)}")
        super().__post_init__()

    # -- peft file boundary -------------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        out["prompt_tuning_init"] = self.init.upper()
        return out

    @classmethod
    def adapt_peft_values(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # A file holds trained virtual tokens: its init is not re-run on load (which would need
        # the tokenizer the file names), so it is read as 'random' and the text is kept.
        kwargs["init"] = "random"
        return kwargs


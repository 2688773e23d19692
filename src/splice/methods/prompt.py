"""Prompt tuning (Lester et al. 2021): trained virtual tokens put before the embedded input.

    h⁰ = [P ; E(x)],   P: (n, d) trained,   E and every transformer weight frozen

P starts as N(0, 1) entries ('random'), as the embeddings of an init text's tokens cut or
repeated to n ('text'), or as the embeddings of n random vocabulary tokens ('sample_vocab').
The shared machinery here (`VirtualTokenLayer`) also carries prefix tuning (methods/prefix.py).

Note: Virtual tokens are never zero-effect
A fresh adapter cannot equal the base model. Each virtual token is a key every real position
attends to, with softmax weight exp(q·k)/Z > 0 for any finite key, and the real tokens sit n
positions later (which changes absolute position embeddings outright, and RoPE scores by
rounding). A gate that switched the tokens off exactly (an attention bias of −∞, a multiplier of
0 on their weight) would pass them no gradient, so training could never open it; a finite bias
−b is neither exact nor trainable at first (its gradient shrinks like e^−b); and the adapter
file format has no place for either. What holds exactly instead, and is tested: with init
'text' the fresh adapter equals the base model reading the init text's tokens before the input
(prefix tuning: the same with the keys and values the model computes for that text), and with
the adapter disabled the model is exactly the base model.

Note: The backbone hooks
The adapter lives on the model (`model.adapter_prompt_tuning`) and hooks the backbone, the module
that maps input ids to the hidden states the output head reads (`model.base_model`), not the
top-level forward, so everything that runs the backbone sees the virtual tokens: the model's
forward, `generate` and splice's chunked loss, which calls the backbone directly. A forward
pre-hook puts the tokens in front (extending a 2-D attention mask with ones, and moving given
position ids n places on); a forward hook drops the n virtual positions from the hidden states,
so logits line up with input_ids and labels need no padding. The cost of that alignment: the
first real token is not predicted from the virtual ones, as the base model never predicts it
(logits that kept the n positions, with labels padded by n ignored entries, would also score
labels[0] from the last virtual token). When the call continues a non-empty KV cache the tokens are already in it: only
the mask and positions move. Several active adapters' tokens are concatenated in activation order.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar, Mapping

import torch
from torch import nn
from transformers import AutoTokenizer

from splice.config.base import AdapterConfig
from splice.config.prompt import PromptTuningConfig, VirtualTokenConfig
from splice.core.errors import AdapterError, TargetError
from splice.core.layer import ModelLevelLayer
from splice.core.registry import MethodSpec, register_method


def backbone_of(model: nn.Module) -> nn.Module:
    """The module that maps input ids to the hidden states the output head reads (transformers'
    `base_model`; a bare backbone is its own)."""
    backbone = getattr(model, "base_model", model)
    if not callable(getattr(backbone, "get_input_embeddings", None)):
        raise TargetError(f"{type(model).__name__} has no input embeddings to put virtual tokens "
                          "before; prompt and prefix tuning need a transformers language model")
    if getattr(getattr(backbone, "config", None), "is_encoder_decoder", False):
        raise TargetError(f"{type(model).__name__} is an encoder-decoder model; prompt and prefix "
                          "tuning here support decoder-only models")
    return backbone


def text_config(model: nn.Module) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def fill_model_fields(config: VirtualTokenConfig, derived: Mapping[str, int],
                      checked: tuple[str, ...]) -> AdapterConfig:
    """`config` with its unset model fields taken from `derived`; a set field in `checked` that
    disagrees with the model means the adapter was made for another model."""
    for name in checked:
        given = getattr(config, name)
        if given is not None and given != derived[name]:
            raise AdapterError(f"the adapter has {name}={given} but this model has {name}="
                               f"{derived[name]}: it was made for a different model; use it with "
                               "the model it was trained on")
    changes = {k: v for k, v in derived.items() if getattr(config, k) is None}
    return config.replace(**changes) if changes else config


def init_token_ids(config: VirtualTokenConfig, vocab_size: int) -> torch.Tensor:
    """num_virtual_tokens token ids to start from: init_text's (with the tokenizer's special
    tokens), cut or repeated to length ('text'), or uniform over the vocabulary."""
    count = config.num_virtual_tokens
    if config.init == "sample_vocab":
        return torch.randint(0, vocab_size, (count,))
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path)
    ids = tokenizer(config.init_text)["input_ids"]
    if not ids:
        raise AdapterError(f"init_text={config.init_text!r} has no tokens; give a non-empty text")
    return torch.tensor((ids * math.ceil(count / len(ids)))[:count])   # [a, b] -> [a, b, a, …]


def extend_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """(B, T) -> (B, n + T): every position sees the n virtual tokens."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise AdapterError("virtual tokens need a 2-D (batch, length) attention mask or none; "
                           "a prepared 4-D mask (e.g. from a static cache) cannot be extended")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def shift_positions(positions: torch.Tensor | None, n: int, with_virtual: bool) -> torch.Tensor | None:
    """Real tokens sit n places on: (B, T) -> (B, T), or (B, n + T) with the virtual tokens'
    own positions 0..n-1 in front."""
    if positions is None:
        return None
    if positions.dim() != 2:
        raise AdapterError(f"virtual tokens need (batch, length) position ids, got shape "
                           f"{tuple(positions.shape)}")
    shifted = positions + n
    if not with_virtual:
        return shifted
    virtual = torch.arange(n, dtype=positions.dtype, device=positions.device)
    return torch.cat([virtual.expand(positions.shape[0], n), shifted], dim=1)


def drop_leading_positions(output: Any, n: int) -> Any:
    """The backbone's output without its first n positions (the virtual tokens')."""
    if isinstance(output, tuple):
        return (output[0][:, n:], *output[1:])
    output["last_hidden_state"] = output["last_hidden_state"][:, n:]    # (B, T, d)
    if output.get("hidden_states") is not None:
        output["hidden_states"] = tuple(h[:, n:] for h in output["hidden_states"])
    return output


class VirtualTokenLayer(ModelLevelLayer):
    """Puts the active adapters' virtual tokens in front of every sequence the backbone reads.
    See Note: The backbone hooks. Subclasses hold the tokens and say how they enter."""

    #: run before other hooks on the backbone (to see the KV cache as the caller passed it)
    hook_first: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.arg_names = list(inspect.signature(backbone.forward).parameters)
        self.cache_arg = "cache" if "cache" in self.arg_names else "past_key_values"
        self.strip = 0  # virtual positions the current call's output must drop
        self.handles: list[Any] = []

    @classmethod
    def install(cls, model: nn.Module) -> "VirtualTokenLayer":
        backbone = backbone_of(model)
        layer = cls(backbone)
        setattr(model, cls.module_name, layer)
        # Bound methods, not closures: a deep copy of the model then hooks the copied layer.
        layer.handles = [
            backbone.register_forward_pre_hook(layer.before_forward, with_kwargs=True,
                                               prepend=cls.hook_first),
            backbone.register_forward_hook(layer.after_forward, with_kwargs=True)]
        return layer

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # -- what a method implements ---------------------------------------------------------------
    def num_tokens(self, name: str) -> int:
        raise NotImplementedError

    def prepare(self, names: list[str], n: int, kwargs: dict[str, Any], cache: Any,
                fresh: bool) -> dict[str, Any]:
        """The backbone's keyword arguments with `names`' n tokens in; `fresh`: the call starts
        a sequence (no cache, or an empty one) rather than continuing one."""
        raise NotImplementedError

    # -- hooks ----------------------------------------------------------------------------------
    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        self.strip = 0
        names = self.adapters_to_apply()
        if not names:
            return None
        kwargs = {**dict(zip(self.arg_names, args)), **kwargs}
        cache = kwargs.pop(self.cache_arg, None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)   # the name before transformers 5
        fresh = cache is None or cache.get_seq_length() == 0
        n = sum(self.num_tokens(name) for name in names)
        kwargs = self.prepare(names, n, kwargs, cache, fresh)
        kwargs["attention_mask"] = extend_mask(kwargs.get("attention_mask"), n)
        return (), kwargs

    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        n, self.strip = self.strip, 0
        return drop_leading_positions(output, n) if n else None


class PromptTuningLayer(VirtualTokenLayer):
    """[P ; E(x)] for the backbone's input: P (n, d) per adapter in `prompt_embeddings`."""

    adapter_prefixes = ("prompt_embeddings",)
    module_name = "adapter_prompt_tuning"
    # Its tokens enter the embeddings, so it must see whether the caller's cache is empty before
    # a prefix adapter fills it.
    hook_first = True

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.prompt_embeddings = nn.ParameterDict()

    @classmethod
    def complete_config(cls, model: nn.Module, config: PromptTuningConfig) -> AdapterConfig:
        width = backbone_of(model).get_input_embeddings().weight.shape[1]
        text = text_config(model)
        derived = {"token_dim": width, "num_layers": text.num_hidden_layers,
                   "num_attention_heads": text.num_attention_heads, "num_transformer_submodules": 1}
        return fill_model_fields(config, derived, checked=("token_dim",))

    def add_adapter(self, name: str, config: PromptTuningConfig, module_path: str) -> None:
        embeddings = self.base_layer.get_input_embeddings()
        weight = embeddings.weight                                       # (V, d)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        if config.init == "random":
            start = torch.randn(config.num_virtual_tokens, weight.shape[1])
        else:
            ids = init_token_ids(config, weight.shape[0]).to(weight.device)
            with torch.no_grad():
                start = embeddings(ids)                                  # (n, d)
        self.prompt_embeddings[name] = nn.Parameter(start.to(device=weight.device, dtype=dtype))

    def num_tokens(self, name: str) -> int:
        return self.prompt_embeddings[name].shape[0]

    def prepare(self, names, n, kwargs, cache, fresh):
        if cache is not None:
            kwargs[self.cache_arg] = cache
        if not fresh:  # the tokens are in the cache already
            kwargs["position_ids"] = shift_positions(kwargs.get("position_ids"), n, False)
            return kwargs
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = self.base_layer.get_input_embeddings()(kwargs["input_ids"])  # (B, T, d)
        virtual = torch.cat([self.prompt_embeddings[m] for m in names]).to(embeds.dtype)  # (n, d)
        virtual = virtual.expand(embeds.shape[0], n, embeds.shape[2])   # (B, n, d)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)  # (B, n + T, d)
        kwargs["input_ids"] = None
        kwargs["position_ids"] = shift_positions(kwargs.get("position_ids"), n, True)
        self.strip = n
        return kwargs


register_method(MethodSpec(
    name="prompt", config_cls=PromptTuningConfig, peft_type="PROMPT_TUNING",
    trains="virtual token embeddings before the input", mergeable=False,
    why_not_mergeable="it changes the input (virtual tokens), there is no weight to fold it into",
    model_adapter=PromptTuningLayer))

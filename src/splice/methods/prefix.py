"""Prefix tuning (Li & Liang 2021): trained keys and values every attention layer also attends to.

    attnₗ(x) = softmax(qₗ·[Kₗ ; kₗ(x)]ᵀ/√d) · [Vₗ ; vₗ(x)],   Kₗ, Vₗ: (n, kv heads × head dim)

The prefix reaches attention as a KV cache that already holds n positions, so the real tokens
sit at positions n.. and the attention mask grows by n ones (see methods/prompt.py, Note: The
backbone hooks). It is stored flat, as peft's adapter format holds it: one row per virtual token,
[K₀ V₀ K₁ V₁ …], each K/V laid out (kv heads, head dim). With prefix_projection the rows are
MLP(E) (the paper's reparameterisation, token_dim → hidden → tanh → 2·layers·token_dim); the file
then holds the MLP's output, and a loaded file trains on that output directly.

Starts ('init'): 'random' N(0, 1) entries (the file format's default); 'zero' keys and values,
which is still not the base model: each query gives the n zero keys the score 0 and takes zero
values from them, so each head's attention output is the base output times Z/(Z + n), where
Z = Σⱼ exp(sⱼ) over the query's scaled scores sⱼ on the real keys (and the layers above differ);
'text' the keys and values the model computes for the init text, with which the fresh adapter is
exactly the base model reading that text before the input. See methods/prompt.py, Note: Virtual
tokens are never zero-effect.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from splice.config.base import AdapterConfig
from splice.config.prefix import PrefixTuningConfig
from splice.core.errors import AdapterError
from splice.core.registry import MethodSpec, register_method
from splice.methods.prompt import (VirtualTokenLayer, backbone_of, fill_model_fields,
                                   init_token_ids, shift_positions, text_config)

FILE_KEY = "prompt_embeddings"


class PrefixTuningLayer(VirtualTokenLayer):
    """Per adapter a flat prefix (n, layers·2·token_dim) in `prefix_embeddings`, or with
    prefix_projection the rows E (n, token_dim) there and their MLP in `prefix_mlp`."""

    adapter_prefixes = ("prefix_embeddings", "prefix_mlp")
    module_name = "adapter_prefix_tuning"

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        self.prefix_embeddings = nn.ParameterDict()
        self.prefix_mlp = nn.ModuleDict()
        self.kv_shape = (0, 0, 0)  # (layers, kv heads, head dim), the same for every adapter

    @classmethod
    def complete_config(cls, model: nn.Module, config: PrefixTuningConfig) -> AdapterConfig:
        backbone_of(model)
        text = text_config(model)
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        derived = {"token_dim": kv_heads * head_dim, "num_layers": text.num_hidden_layers,
                   "num_attention_heads": kv_heads, "num_transformer_submodules": 1}
        config = fill_model_fields(config, derived, checked=("token_dim", "num_layers",
                                                             "num_attention_heads"))
        if config.encoder_hidden_size is None:
            config = config.replace(encoder_hidden_size=config.token_dim)
        return config

    def add_adapter(self, name: str, config: PrefixTuningConfig, module_path: str) -> None:
        weight = self.base_layer.get_input_embeddings().weight
        factory = {"device": weight.device,
                   "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        layers, heads, dim = config.num_layers, config.num_attention_heads, config.token_dim
        self.kv_shape = (layers, heads, dim // heads)
        n, width = config.num_virtual_tokens, layers * 2 * dim
        if config.prefix_projection:
            self.prefix_embeddings[name] = nn.Parameter(torch.randn(n, dim, **factory))
            mlp = nn.Sequential(nn.Linear(dim, config.encoder_hidden_size, **factory), nn.Tanh(),
                                nn.Linear(config.encoder_hidden_size, width, **factory))
            if config.init == "zero":
                nn.init.zeros_(mlp[2].weight)
                nn.init.zeros_(mlp[2].bias)
            self.prefix_mlp[name] = mlp
        elif config.init == "text":
            self.prefix_embeddings[name] = nn.Parameter(self.text_prefix(config).to(**factory))
        else:
            start = torch.zeros if config.init == "zero" else torch.randn
            self.prefix_embeddings[name] = nn.Parameter(start(n, width, **factory))

    @torch.no_grad()
    def text_prefix(self, config: PrefixTuningConfig) -> torch.Tensor:
        """(n, layers·2·token_dim): the keys and values the model computes for the init text."""
        n = config.num_virtual_tokens
        table = self.base_layer.get_input_embeddings().weight                 # (V, d)
        ids = init_token_ids(config, table.shape[0]).to(table.device)         # (n,)
        was_training = self.base_layer.training
        self.base_layer.eval()  # the activations themselves, without dropout noise
        try:
            out = self.base_layer(input_ids=ids[None], use_cache=True)
        finally:
            self.base_layer.train(was_training)
        cache = out[self.cache_arg] if self.cache_arg in out else out["past_key_values"]
        # Other active virtual-token adapters may sit in front: the text's are the last n.
        rows = [torch.stack([cache.layers[i].keys[0, :, -n:], cache.layers[i].values[0, :, -n:]])
                for i in range(config.num_layers)]                        # (2, H, n, hd) each
        kv = torch.stack(rows)                                            # (L, 2, H, n, hd)
        return kv.permute(3, 0, 1, 2, 4).reshape(n, -1)                   # (n, L·2·H·hd)

    def flat_prefix(self, name: str) -> torch.Tensor:
        """(n, layers·2·token_dim) for adapter `name`."""
        rows = self.prefix_embeddings[name]
        return self.prefix_mlp[name](rows) if name in self.prefix_mlp else rows

    def num_tokens(self, name: str) -> int:
        return self.prefix_embeddings[name].shape[0]

    # -- file boundary: one flat tensor, as the file format holds it -------------------------------
    def file_tensors(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.prefix_embeddings:
            return {}
        if name in self.prefix_mlp:
            with torch.no_grad():
                return {FILE_KEY: self.flat_prefix(name)}
        return {FILE_KEY: self.prefix_embeddings[name]}

    @torch.no_grad()
    def load_file_tensors(self, name: str, values) -> None:
        value = values[FILE_KEY]
        current = self.prefix_embeddings[name]
        if name in self.prefix_mlp:
            # The file holds the MLP's output, which no MLP weights can be recovered from.
            del self.prefix_mlp[name]
            self.prefix_embeddings[name] = nn.Parameter(value.to(device=current.device,
                                                                 dtype=current.dtype))
        else:
            current.copy_(value.to(current.dtype))

    # -- the hook's work --------------------------------------------------------------------------
    def prepare(self, names, n, kwargs, cache, fresh):
        self.check_cache_survives()
        if cache is None:
            cache = DynamicCache(config=getattr(self.base_layer, "config", None))
        elif not isinstance(cache, DynamicCache):
            raise AdapterError(f"prefix tuning fills a DynamicCache with its keys and values; got a "
                               f"{type(cache).__name__} (generate without cache_implementation)")
        if fresh:
            inputs = kwargs.get("input_ids")
            batch = (inputs if inputs is not None else kwargs["inputs_embeds"]).shape[0]
            self.fill(cache, names, n, batch)
        kwargs[self.cache_arg] = cache
        kwargs["position_ids"] = shift_positions(kwargs.get("position_ids"), n, False)
        return kwargs

    def fill(self, cache: DynamicCache, names: list[str], n: int, batch: int) -> None:
        layers, heads, head_dim = self.kv_shape
        dtype = self.base_layer.get_input_embeddings().weight.dtype
        flat = torch.cat([self.flat_prefix(m) for m in names])               # (n, L·2·H·hd)
        kv = flat.to(dtype).view(n, layers * 2, heads, head_dim).permute(1, 2, 0, 3)  # (2L, H, n, hd)
        for i in range(layers):
            cache.update(kv[2 * i].expand(batch, heads, n, head_dim),
                         kv[2 * i + 1].expand(batch, heads, n, head_dim), i)

    def check_cache_survives(self) -> None:
        """Activation checkpointing drops the KV cache in training, and the prefix with it."""
        if self.base_layer.training and torch.is_grad_enabled() and any(
                getattr(m, "gradient_checkpointing", False) for m in self.base_layer.modules()):
            raise AdapterError("prefix tuning reaches attention through the KV cache, which gradient "
                               "checkpointing drops in training; call "
                               "model.gradient_checkpointing_disable() (or use prompt tuning)")


register_method(MethodSpec(
    name="prefix", config_cls=PrefixTuningConfig, peft_type="PREFIX_TUNING",
    trains="key/value prefixes for every attention layer", mergeable=False,
    why_not_mergeable="it changes the input (virtual tokens), there is no weight to fold it into",
    model_adapter=PrefixTuningLayer))

"""A KV cache per request, and the attention that decodes a batch of them in one forward.

    use_row_attention(model)                       # once; other forwards stay plain sdpa
    cache = RequestCache.from_prefill(out.cache, capacity=len(prompt) + max_tokens)
    logits = model(tokens, position_ids=positions, attention_mask=row_mask(3), use_cache=False,
                   splice_rows=DecodeRows([cache_a, None, cache_b], [n_a, 0, n_b])).logits

Note: Batch-invariant decoding
A request must decode to the same tokens whether it runs alone or in a busy batch. Two things
in an ordinary padded batch break that in the last ulp, and a last-ulp change can flip a greedy
token: (1) a matmul kernel picks its blocking by the number of rows M (measured on CPU: M = 1,
M = 2-3 and M >= 4 sum in different orders), and (2) attention over a left-padded cache sums
softmax weights and values over the padded length, so the order depends on the longest
neighbour. The engine therefore (1) decodes a fixed number of rows every step (the batch width;
idle rows are padding that nobody reads) and (2) runs attention row by row over each request's
own cache, of its own length. Every kernel then sees for a row exactly the shapes and values it
sees when the row runs alone, and the row's output is bit-identical. The per-row attention costs
a small loop per layer (rows × layers small calls); the linears, where the time goes, stay batched.
The prefill runs each prompt alone, so it is invariant by construction.
Measured on SmolLM2 (CPU, 2 threads, 8 rows, caches of 40-80 tokens): a step with the row
attention takes 0.91x the time of the same step as one left-padded sdpa batch; the padding rows
are the real price: a step of one live row padded to 8 costs what 8 live rows cost (~3.5x one
unpadded row), which is why ServeConfig.batch_invariant can turn it off.
Guaranteed: for a given model, prompt, adapter version, sampling parameters and seed, and
batch width, the tokens and logits are the same whatever else runs; this holds as long as the
largest rank among the attached adapters stays the same (routed LoRA pads every adapter to
that rank, and a wider padding may change a sum's blocking).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "splice_rows"
_REGISTER_LOCK = threading.Lock()
_REGISTERED = False


class RequestCache:
    """One request's keys and values, per layer (1, kv_heads, capacity, head_dim), preallocated
    for its prompt plus its token budget, so appending a token is a copy, not a reallocation."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        self.layers = layers
        self.length = length

    @classmethod
    def from_prefill(cls, cache: Any, capacity: int) -> "RequestCache":
        layers = []
        for layer in cache.layers:
            keys, values = layer.keys, layer.values                  # (1, kv_heads, T, d)
            shape = (1, keys.shape[1], capacity, keys.shape[3])
            k, v = keys.new_zeros(shape), values.new_zeros(shape)
            k[:, :, :keys.shape[2]] = keys
            v[:, :, :values.shape[2]] = values
            layers.append((k, v))
        return cls(layers, cache.layers[0].keys.shape[2])

    @property
    def capacity(self) -> int:
        return self.layers[0][0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


@dataclass
class DecodeRows:
    """The caches of one decode step's rows (None for a padding row) and their lengths before
    this step's token."""

    caches: list[RequestCache | None]
    lengths: list[int]


# A 4D mask is passed through by transformers' mask building untouched; the row attention
# ignores it (each row attends to its own cache, all of which is valid).
def row_mask(rows: int, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.zeros(rows, 1, 1, 1, device=device)


def attend_rows(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None = None,
                dropout: float = 0.0, splice_rows: DecodeRows | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """An attention function for transformers' attention interface: the model's usual sdpa
    attention, except in a decode step given `splice_rows`, where each row appends its new key
    and value to its own cache and attends over that cache alone.
    query (b, heads, 1, d), key/value (b, kv_heads, 1, d) -> (b, 1, heads, d)."""
    if splice_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    out = query.new_zeros(query.shape[0], 1, query.shape[1], query.shape[3])  # (b, 1, heads, d)
    layer = module.layer_idx
    for row, (cache, n) in enumerate(zip(splice_rows.caches, splice_rows.lengths)):
        if cache is None:
            continue
        k, v = cache.layers[layer]                                          # (1, kv, cap, d)
        k[:, :, n] = key[row:row + 1, :, 0]
        v[:, :, n] = value[row:row + 1, :, 0]
        o = F.scaled_dot_product_attention(query[row:row + 1], k[:, :, :n + 1], v[:, :, :n + 1],
                                           scale=scaling, enable_gqa=True)  # (1, heads, 1, d)
        out[row] = o[0].transpose(0, 1)
    return out, None


def register_row_attention() -> None:
    """Make `attend_rows` known to transformers under ATTENTION_NAME (once per process)."""
    global _REGISTERED
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        AttentionInterface.register(ATTENTION_NAME, attend_rows)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        _REGISTERED = True


def use_row_attention(model: nn.Module) -> None:
    """Switch `model` to the row attention for good: outside a decode step it is sdpa, so the
    model's other forwards compute exactly what they did."""
    register_row_attention()
    model.set_attn_implementation(ATTENTION_NAME)


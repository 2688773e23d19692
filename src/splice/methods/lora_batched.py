"""LoRA for a routed batch: every row with its own adapter, in one batched computation.

For a layer holding adapters 0..N-1 and row i routed to adapter k_i (see core/routing.py):

    y_i = W₀x_i + s_k·B_k·A_k·x_i,   k = k_i      (and y_i = W₀x_i for a row on the base)

computed as two batched matmuls over weights gathered per row from stacks of all the layer's
adapters, not a loop over adapters (the BGMV idea of Punica and S-LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from splice.core.errors import AdapterError
from splice.core.routing import Route

# Note: Stacked adapter weights
# A layer's adapters are stacked once into Aᵀ: (N+1, in, r_max) and (s·B)ᵀ: (N+1, r_max, out),
# each zero-padded to the largest rank r_max (zero rows of A and columns of B add nothing, so
# mixing ranks is exact) with the scale s folded into B, and slot N all zero: the slot of rows
# on the base and of adapters this layer does not hold. A routed forward then gathers each row's
# slot with index_select (b gathers of r_max·(in + out) numbers) and runs
#     h = x Aᵀ[slots]   (b, t, r_max)      y += h (s·B)ᵀ[slots]   (b, t, out)
# whatever the number of distinct adapters in the batch. The gathers copy b·r_max·(in + out)
# numbers per layer and call: with 64 tokens a row that is noise next to the matmuls (a batch
# over 16 adapters runs as fast as over one, bench/mixed_batch.py), with one token a row
# (decoding) it nears the base layer's own weight read, the price of gathering in PyTorch
# instead of inside a fused kernel.
# The stacks are cached on the layer, keyed by each tensor's identity, storage and version
# counter: an in-place change (a hot-swap, an optimizer step, a load) makes a new key, and so
# does a move to another device or dtype; adding or removing an adapter drops them
# (`forget_stacks`). They copy the adapters' weights (N·r_max·(in + out) numbers per layer).
# While adapter parameters need gradients, the stacks are rebuilt on every call from the live
# parameters (differentiably) and not cached.


@dataclass(frozen=True)
class Stacks:
    key: tuple | None
    order: tuple[str, ...]   # adapter names, by slot
    a: torch.Tensor          # (N+1, k, r_max): Aᵀ per slot (k = in_features, or the vocabulary)
    b: torch.Tensor          # (N+1, r_max, m): (s·B)ᵀ per slot (m = out_features, or the dim)


STACKS_ATTR = "routed_stacks"


def forget_stacks(layer: nn.Module) -> None:
    """Drop the layer's cached stacks (its adapters changed). See Note: Stacked adapter weights."""
    layer.__dict__.pop(STACKS_ATTR, None)


def stacks_for(layer: nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Stacks:
    """The stacks of `pairs` (name -> (A (r, k), B (m, r))), cached. See Note: Stacked adapter
    weights."""
    tensors = [t for pair in pairs.values() for t in pair]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return build_stacks(None, pairs, layer.scaling)
    key = stack_key(pairs, layer.scaling)
    cached = layer.__dict__.get(STACKS_ATTR)
    if key is not None and cached is not None and cached.key == key:
        return cached
    with torch.no_grad():
        stacks = build_stacks(key, pairs, layer.scaling)
    if key is not None:
        layer.__dict__[STACKS_ATTR] = stacks
    return stacks


def stack_key(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
              scaling: dict[str, float]) -> tuple | None:
    """What the stacks depend on; None (do not cache) for tensors without a version counter."""
    tensors = [t for pair in pairs.values() for t in pair]
    if any(t.is_inference() for t in tensors):
        return None
    return (tuple(pairs), tuple(scaling[n] for n in pairs), torch.is_inference_mode_enabled(),
            tuple([(id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors]))


def build_stacks(key: tuple | None, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 scaling: dict[str, float]) -> Stacks:
    first_a, first_b = next(iter(pairs.values()))
    r_max = max(a.shape[0] for a, _ in pairs.values())
    slots = len(pairs) + 1
    a_stack = first_a.new_zeros(slots, first_a.shape[1], r_max)      # (N+1, k, r_max)
    b_stack = first_b.new_zeros(slots, r_max, first_b.shape[0])      # (N+1, r_max, m)
    for i, (name, (a, b)) in enumerate(pairs.items()):
        rank = a.shape[0]
        a_stack[i, :, :rank] = a.T
        b_stack[i, :rank] = (b.float().T * scaling[name]).to(b_stack.dtype)
    return Stacks(key, tuple(pairs), a_stack, b_stack)


def add_delta(result: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """result (n·…, out) + h (n, m, r) @ b (n, r, out), in place where the layout allows."""
    n = h.shape[0]
    if result.dtype == h.dtype and result.is_contiguous():
        result.view(n, -1, result.shape[-1]).baddbmm_(h, b)
        return result
    return result + torch.bmm(h, b).view(result.shape).to(result.dtype)


def per_row_ids(ids: torch.Tensor, route: Route) -> torch.Tensor:
    """ids with one row per routed name where the batch shares a single row (GPT-2's position
    ids are (1, T), broadcast over the batch); checked to hold k rows per name otherwise."""
    if ids.shape[0] == 1 and len(route.names) > 1:
        return ids.expand(len(route.names), *ids.shape[1:])
    route.rows_per_name(ids.shape[0])
    return ids


def check_no_dropout(layer: nn.Module, route: Route, order: tuple[str, ...]) -> None:
    if layer.training and any(not isinstance(layer.lora_dropout[n], nn.Identity)
                              for n in set(route.names) & set(order)):
        raise AdapterError("routed rows run without adapter dropout, and an adapter in this batch "
                           "has dropout > 0 in training mode: call model.eval(), or train routed "
                           "batches with LoRAConfig(dropout=0)")


def routed_linear(layer: nn.Module, x: torch.Tensor, route: Route) -> torch.Tensor:
    """LoRALinear's forward for a routed batch: (rows, ..., in) -> (rows, ..., out)."""
    pairs = {name: (layer.lora_A[name].weight, layer.lora_B[name].weight) for name in layer.lora_A}
    slots = None if layer.disabled else route.slots(tuple(pairs), x.device)  # (n,)
    if slots is None:
        return layer.base_layer(x)
    check_no_dropout(layer, route, tuple(pairs))
    route.rows_per_name(x.shape[0])
    result = layer.base_layer(x)                                    # (rows, ..., out)
    stacks = stacks_for(layer, pairs)
    xs = x.reshape(slots.shape[0], -1, x.shape[-1]).to(stacks.a.dtype)  # (n, m, in)
    h = torch.bmm(xs, stacks.a.index_select(0, slots))                  # (n, m, r_max)
    return add_delta(result, h, stacks.b.index_select(0, slots))


def routed_embedding(layer: nn.Module, ids: torch.Tensor, route: Route) -> torch.Tensor:
    """LoRAEmbedding's forward for a routed batch: (rows, ...) ids -> (rows, ..., dim)."""
    pairs = {name: (layer.lora_embedding_A[name], layer.lora_embedding_B[name])
             for name in layer.lora_embedding_A}
    slots = None if layer.disabled else route.slots(tuple(pairs), ids.device)  # (n,)
    if slots is None:
        return layer.base_layer(ids)
    if layer.base_layer.max_norm is not None:
        raise AdapterError("an embedding with max_norm renormalises its table in place, which "
                           "routed rows do not reproduce; run this model's rows per adapter")
    ids = per_row_ids(ids, route)
    result = layer.base_layer(ids)                                  # (rows, ..., dim)
    stacks = stacks_for(layer, pairs)
    vocab, rank = stacks.a.shape[1:]
    # Row i reads table slots[i]: its ids, offset into the flattened ((N+1)·V, r_max) stack.
    flat = ids.reshape(slots.shape[0], -1) + slots[:, None] * vocab     # (n, m)
    h = F.embedding(flat, stacks.a.view(-1, rank))                      # (n, m, r_max)
    return add_delta(result, h, stacks.b.index_select(0, slots))

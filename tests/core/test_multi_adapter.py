"""Several named adapters on one model: activation, summing, disabling, deleting."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import splice
from helpers import logits, randomize_adapter, token_ids

QV = ["q_proj", "v_proj"]


def two_adapters(model):
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules=QV), "a")
    splice.attach(model, splice.LoRAConfig(rank=2, alpha=3, target_modules=["q_proj", "o_proj"]), "b")
    randomize_adapter(model, "a", seed=1)
    randomize_adapter(model, "b", seed=2)
    return model


def merged_copy(model, names):
    """A dense recomputation: a copy whose weights hold W + Σ ΔW of `names`, adapters removed."""
    clone = copy.deepcopy(model)
    splice.set_active_adapters(clone, names)
    return splice.merge_and_unload(clone)


def test_attach_activates_the_new_adapter_alone(tiny_llama):
    two_adapters(tiny_llama)
    assert splice.active_adapters(tiny_llama) == ["b"]
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".b." in n for n in trainable)


@pytest.mark.parametrize("names", [["a"], ["b"], ["a", "b"]])
def test_active_adapters_add_up_like_a_dense_merge(tiny_llama, names):
    model = two_adapters(tiny_llama)
    splice.set_active_adapters(model, names)
    ids = token_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(merged_copy(model, names), ids), atol=1e-5, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".")[-2] for n in trainable} == set(names)


def test_switching_does_not_touch_base_weights(tiny_llama):
    model = two_adapters(tiny_llama)
    before = {n: p.clone() for n, p in model.named_parameters() if "base_layer" in n}
    for names in (["a"], ["b"], ["a", "b"], ["a"]):
        splice.set_active_adapters(model, names)
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in before.items())


def test_unknown_adapter_name_lists_the_attached_ones(tiny_llama):
    model = two_adapters(tiny_llama)
    with pytest.raises(splice.AdapterError, match="attached: a, b"):
        splice.set_active_adapters(model, ["c"])


def test_delete_one_keeps_the_other_exactly(tiny_llama):
    model = two_adapters(tiny_llama)
    splice.set_active_adapters(model, ["a"])
    ids = token_ids(model)
    expected = logits(model, ids)
    splice.delete_adapter(model, "b")
    assert splice.list_adapters(model).keys() == {"a"}
    assert torch.equal(logits(model, ids), expected)
    assert not any("o_proj.base_layer" in n for n, _ in model.named_parameters())  # unwrapped


def test_disable_with_merged_adapters_gives_the_base_and_restores(tiny_llama):
    base = copy.deepcopy(tiny_llama)
    model = two_adapters(tiny_llama)
    splice.set_active_adapters(model, ["a", "b"])
    ids = token_ids(model)
    adapted = logits(model, ids)
    splice.merge_adapter(model)
    with splice.disable_adapters(model):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, ids), adapted, atol=1e-5, rtol=0)


def test_merged_adapter_cannot_be_deactivated_or_deleted(tiny_llama):
    model = two_adapters(tiny_llama)
    splice.merge_adapter(model)
    with pytest.raises(splice.AdapterError, match="unmerge"):
        splice.set_active_adapters(model, ["a"])
    with pytest.raises(splice.AdapterError, match="unmerge"):
        splice.delete_adapter(model, "b")


@settings(max_examples=25, deadline=None)
@given(d_in=st.integers(1, 24), d_out=st.integers(1, 24), rank=st.integers(1, 8),
       alpha=st.floats(0.5, 64), rslora=st.booleans(), batch=st.integers(1, 3))
def test_lora_linear_equals_the_closed_form(d_in, d_out, rank, alpha, rslora, batch):
    """y = W₀x + b + s·B·A·x with s = α/r (α/√r for rsLoRA), for any shape and rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    splice.attach(model, splice.LoRAConfig(rank=rank, alpha=alpha, use_rslora=rslora, target_modules=["0"]))
    layer = model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = alpha / rank ** 0.5 if rslora else alpha / rank
    x = torch.randn(batch, d_in)
    expected = x @ (w0 + scale * b @ a).T + b0
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)

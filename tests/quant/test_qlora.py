"""Linear4bit, quantize_model and LoRA on a 4-bit base (QLoRA), on tiny models.

References: bitsandbytes' own quantize/dequantize followed by a dense F.linear (forward), a dense
recomputation through autograd (gradients), and the model before quantizing (structure).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splice
from helpers import assert_same_snapshot, logits, randomize_adapter, snapshot, token_ids
from splice.quant import (Linear4bit, dequantize_model, dequantize_nf4, load_quantized,
                          quantize_model, quantize_nf4, save_quantized)

bnbf = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_equals_bitsandbytes_dequantize_then_dense_linear(double_quant):
    torch.manual_seed(0)
    # in_features a multiple of 64: bitsandbytes 0.50's CPU dequantize kernel decodes rows whose
    # length is not a multiple of the block wrongly (e.g. (40, 96): errors of 0.2), while its
    # bytes still equal ours; test_nf4 checks those shapes against the closed form.
    linear = nn.Linear(128, 40)
    layer = Linear4bit.from_linear(linear, double_quant=double_quant)
    packed, state = bnbf.quantize_4bit(linear.weight.detach(), quant_type="nf4", blocksize=64,
                                       compress_statistics=double_quant)
    weight = bnbf.dequantize_4bit(packed, state, quant_type="nf4")
    x = torch.randn(3, 5, 128)
    torch.testing.assert_close(layer(x), F.linear(x, weight, linear.bias), atol=1e-6, rtol=0)


def test_input_and_bias_gradients_equal_the_dense_path_and_no_weight_gradient_exists():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = Linear4bit.from_linear(linear)
    layer.bias.requires_grad_(True)
    dense_w = dequantize_nf4(layer.quant)
    dense_b = layer.bias.detach().clone().requires_grad_(True)
    x = torch.randn(4, 64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    grad = torch.randn(4, 48)
    layer(x).backward(grad)
    F.linear(x2, dense_w, dense_b).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.bias.grad, dense_b.grad, atol=1e-6, rtol=0)
    assert [n for n, _ in layer.named_parameters()] == ["bias"]


def test_no_full_precision_weight_is_held_between_calls():
    layer = Linear4bit.from_linear(nn.Linear(256, 128, bias=False))
    layer(torch.randn(2, 256)).sum()
    held = sum(t.numel() * t.element_size() for t in list(layer.buffers()) + list(layer.parameters()))
    dense = 256 * 128 * 4
    assert held < dense / 7           # 4.127 bits per weight: about 1/7.75 of fp32
    assert layer.storage_bytes() == held


def test_dtype_cast_keeps_the_quantized_bytes_and_scales():
    layer = Linear4bit.from_linear(nn.Linear(64, 64), double_quant=False)
    before = layer.dequantize(torch.float32).clone()
    layer.to(torch.bfloat16)
    assert layer.nf4_absmax.dtype == torch.int32        # fp32 bits, untouched by the cast
    torch.testing.assert_close(layer.dequantize(torch.float32), before, atol=0, rtol=0)


def test_quantize_model_swaps_every_linear_but_the_head_and_reports_measured_bits(tiny_llama):
    linears = [n for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    report = quantize_model(tiny_llama)
    assert report.modules == len(linears)
    assert all(isinstance(tiny_llama.get_submodule(n), Linear4bit) for n in linears)
    assert type(tiny_llama.lm_head) is nn.Linear
    held = sum(b.numel() * b.element_size() for n, b in tiny_llama.named_buffers() if ".nf4_" in n)
    assert report.bytes_after == held
    assert 4.0 < report.bits_per_param < 4.6


def test_quantize_model_that_fails_leaves_the_model_unchanged(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    before = snapshot(tiny_llama)
    with pytest.raises(ValueError, match="NaN"):
        quantize_model(tiny_llama)
    assert_same_snapshot(before, snapshot(tiny_llama))


def test_quantized_model_refuses_adapters_already_attached(tiny_llama):
    splice.attach(tiny_llama, splice.LoRAConfig(rank=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="quantize the base first"):
        quantize_model(tiny_llama)


def qlora_model(model):
    quantize_model(model)
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules="all-linear"))
    return model


def test_fresh_lora_on_a_4bit_base_is_exactly_the_4bit_base(tiny_llama):
    ids = token_ids(tiny_llama)
    quantize_model(tiny_llama)
    expected = logits(tiny_llama, ids)
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, target_modules="all-linear"))
    assert torch.equal(logits(tiny_llama, ids), expected)


def test_qlora_training_moves_only_the_adapter_and_never_the_nf4_bytes(tiny_llama):
    model = qlora_model(tiny_llama)
    nf4_before = {n: b.clone() for n, b in model.named_buffers() if ".nf4_" in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    ids = token_ids(model, batch=4, length=12)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0]  # the same curve as LoRA on the fp32 base
    for name, value in model.named_buffers():
        if ".nf4_" in name:
            assert torch.equal(value, nf4_before[name]), name


def test_qlora_gradients_equal_lora_on_the_dequantized_base(tiny_llama):
    ids = token_ids(tiny_llama)
    model = qlora_model(tiny_llama)
    randomize_adapter(model)
    dense = copy.deepcopy(model)
    dequantize_model(dense)
    model(ids, labels=ids).loss.backward()
    dense(ids, labels=ids).loss.backward()
    grads = dict(dense.named_parameters())
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-5, rtol=1e-4)


def test_merge_into_a_4bit_base_is_refused_and_after_dequantizing_it_is_exact(tiny_llama):
    ids = token_ids(tiny_llama)
    model = qlora_model(tiny_llama)
    randomize_adapter(model)
    unmerged = logits(model, ids)
    before = snapshot(model)
    with pytest.raises(splice.AdapterError, match="NF4"):
        splice.merge_adapter(model)
    assert_same_snapshot(before, snapshot(model))
    dequantize_model(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    merged = splice.merge_and_unload(model)
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_quantized_folder_round_trip_gives_identical_logits(tied, tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)).eval()
    ids = token_ids(model)
    quantize_model(model)
    expected = logits(model, ids)
    save_quantized(model, tmp_path / "q4")
    loaded = load_quantized(tmp_path / "q4", AutoModelForCausalLM)
    assert sum(isinstance(m, Linear4bit) for m in loaded.modules()) == 14
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    assert torch.equal(logits(loaded, ids), expected)
    with pytest.raises(FileExistsError):
        save_quantized(model, tmp_path / "q4")


def test_parameter_counts_include_the_quantized_weights(tiny_llama):
    before = splice.core.accounting.count_trainable(tiny_llama).total
    quantize_model(tiny_llama)
    assert splice.core.accounting.count_trainable(tiny_llama).total == before


def test_attach_with_quantize_equals_quantize_then_attach(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    quantize_model(reference)
    torch.manual_seed(5)
    splice.attach(reference, splice.LoRAConfig(rank=4, target_modules="all-linear"))
    randomize_adapter(reference)
    torch.manual_seed(5)
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, target_modules="all-linear"), quantize="nf4")
    randomize_adapter(tiny_llama)
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    assert all(not m.training for m in tiny_llama.modules())
    ids = token_ids(tiny_llama)
    assert torch.equal(logits(tiny_llama, ids), logits(reference, ids))
    # a second adapter on the now 4-bit base: nothing left to quantize, nothing refused
    splice.attach(tiny_llama, splice.LoRAConfig(rank=2, target_modules=["q_proj"]), "second", quantize="nf4")


def test_a_failed_attach_with_quantize_leaves_the_full_precision_model(tiny_llama):
    before = snapshot(tiny_llama)
    with pytest.raises(splice.TargetError):
        splice.attach(tiny_llama, splice.LoRAConfig(rank=4, target_modules=["no_such_module"]),
                      quantize="nf4")
    assert_same_snapshot(before, snapshot(tiny_llama))
    assert not any(isinstance(m, Linear4bit) for m in tiny_llama.modules())
    with pytest.raises(splice.AdapterError, match="nf4"):
        splice.attach(tiny_llama, splice.LoRAConfig(rank=4, target_modules="all-linear"), quantize="int3")


def test_qlora_forward_keeps_no_dense_weight_for_backward(tiny_llama):
    model = qlora_model(tiny_llama)
    model.train()
    shapes = {tuple(m.quant.shape) for _, m in splice.quant.quantized_layers(model)}
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(token_ids(model), labels=token_ids(model)).loss
    loss.backward()
    assert saved and not shapes & set(saved)


"""The planner's formulas against closed forms, splice's own counters and autograd's saved tensors."""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import splice
from splice.config.base import ConfigError
from splice.core.report import parameter_report
from splice.plan import (MemoryPlan, lora_parameters, nf4_bytes, plan_all_methods, plan_memory,
                         shape_from_model, shape_from_preset)
from splice.plan.chart import plot_plans
from splice.plan.estimate import PlanSettings, block_bytes_per_token
from splice.plan.examples import GPU_48GB, example_plans
from splice.quant.surgery import plan_quantization
from splice.train.loss import causal_lm_loss

TARGETS = ["all-linear", "q_proj,v_proj", r".*\.mlp\.(gate|down)_proj", "embed_tokens,o_proj",
           "lm_head"]


def small_llama(layers: int = 2, tied: bool = True, dtype: torch.dtype = torch.float32):
    config = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=80,
                         num_hidden_layers=layers, num_attention_heads=6, num_key_value_heads=2,
                         tie_word_embeddings=tied)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


# --- parameters ----------------------------------------------------------------------------


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("tied", [False, True])
def test_lora_count_equals_parameter_report(targets, tied):
    model = small_llama(tied=tied)
    shape = shape_from_model(model)
    spec = splice.config.base.parse_targets(targets)
    report = parameter_report(model, splice.LoRAConfig(rank=3, target_modules=spec))
    assert lora_parameters(shape, 3, targets) == report.adapter_params


@pytest.mark.integration
def test_lora_count_equals_parameter_report_on_smollm2(smollm2):
    model, _ = smollm2
    shape = shape_from_model(model)
    for rank, targets in [(8, "all-linear"), (16, "q_proj,v_proj")]:
        report = parameter_report(model, splice.LoRAConfig(
            rank=rank, target_modules=splice.config.base.parse_targets(targets)))
        assert lora_parameters(shape, rank, targets) == report.adapter_params
    assert lora_parameters(shape, 8) == 2_442_240   # peft's count, see MACHINE-NOTES


def test_targets_that_select_nothing_name_the_choices():
    with pytest.raises(ConfigError, match="selects no module.*q_proj"):
        plan_memory(shape_from_preset("7B"), "lora", targets="c_attn")


def nf4_layer_bytes(model, double_quant: bool = True) -> int:
    return sum(layer.storage_bytes() for _, layer in plan_quantization(model, double_quant=double_quant))


@pytest.mark.parametrize("double_quant", [True, False])
def test_qlora_frozen_bytes_equal_splices_nf4_storage(double_quant):
    # 80 × 48 weights: 60 blocks, a short last block in the flattened gate/up/down weights
    model = small_llama(tied=False)
    shape = shape_from_model(model)
    plan = plan_memory(shape, "qlora", dtype="fp32", double_quant=double_quant)
    kept = shape.params - sum(m.numel for m in shape.modules() if m.kind == "linear")
    assert plan.frozen_weights == nf4_layer_bytes(model, double_quant) + 4 * kept


@pytest.mark.integration
def test_qlora_frozen_bytes_equal_splices_nf4_storage_on_smollm2(smollm2):
    """Every SmolLM2 block has the same projections, so one block built from its config and
    quantized by splice stands for all 30 (quantizing the whole model takes a minute here)."""
    model, _ = smollm2
    shape = shape_from_model(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = 1
    one_block = LlamaForCausalLM(config)
    linears = [m.numel for m in shape.modules() if m.kind == "linear"]
    planned = sum(nf4_bytes(n) for n in linears)
    assert planned == shape.layers * nf4_layer_bytes(one_block)
    assert 8 * planned / sum(linears) == pytest.approx(4.127, abs=5e-4)
    plan = plan_memory(shape, "qlora", dtype="fp32")
    assert plan.frozen_weights == planned + 4 * (shape.params - sum(linears))


def test_nf4_closed_form():
    # 4 bits + one byte per 64 + 4 bytes per 256 blocks + a 4-byte offset
    n = 4096 * 4096
    assert nf4_bytes(n) == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4
    assert nf4_bytes(n, double_quant=False) == n // 2 + 4 * (n // 64)


# --- closed forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_full_fine_tuning_is_16_bytes_per_param_plus_activations(dtype):
    shape = shape_from_preset("7B")
    plan = plan_memory(shape, "full", dtype=dtype, batch=1, seq=512)
    assert plan.trainable_params == shape.params == 6_738_415_616
    assert plan.trainable_weights + plan.gradients + plan.optimizer_state == 16 * shape.params
    assert plan.frozen_weights == 0
    assert plan.total >= 12 * shape.params + max(plan.gradients, plan.activations)
    assert plan.total <= plan.sum_of_parts + 2 * shape.vocab * shape.hidden * 4


def test_optimizer_state_per_trainable_parameter():
    shape = shape_from_preset("7B")
    lora = dict(rank=16, targets="q_proj", dtype="fp32")
    n = lora_parameters(shape, 16, "q_proj")
    assert plan_memory(shape, "lora", optimizer="adamw", **lora).optimizer_state == 8 * n
    paged = plan_memory(shape, "lora", optimizer="paged", **lora)
    assert (paged.optimizer_state, paged.host_optimizer_state) == (0, 8 * n)
    assert paged.settings.optimizer == "paged_adamw"
    # q_proj A (16 × 4096) and B (4096 × 16): 65,536 elements each, 256 blocks of 256
    eight = plan_memory(shape, "lora", optimizer="adamw8bit", **lora)
    assert eight.optimizer_state == shape.layers * 2 * (2 * 65_536 + 2 * 4 * 256)
    small = plan_memory(shape_from_preset("135M", "smollm2"), "lora", rank=4, targets="k_proj",
                        optimizer="adamw8bit", dtype="fp32")   # 4·576 and 192·4 < 4096: fp32 state
    assert small.optimizer_state == 8 * small.trainable_params
    bf16 = plan_memory(shape, "lora", optimizer="adamw", **{**lora, "dtype": "bf16"})
    assert bf16.optimizer_state == 12 * n and bf16.trainable_weights == 2 * n


def test_qlora_65b_fits_48gb_with_checkpointing_and_the_paged_optimizer():
    shape = shape_from_preset("65B")
    for rank in (16, 64):
        plan = plan_memory(shape, "qlora", rank=rank, batch=1, seq=512, grad_checkpointing=True,
                           optimizer="paged_adamw", dtype="bf16")
        assert plan.total < GPU_48GB
        # the 4-bit base alone: 4.127 bits for the block projections
        assert plan.frozen_weights == pytest.approx(shape.params * 4.127 / 8, rel=0.04)
    assert plan_memory(shape, "lora", rank=16, batch=1, seq=512, grad_checkpointing=True,
                       optimizer="paged_adamw").total > 2 * GPU_48GB


def test_examples_are_the_headline_cases():
    seven, sixty_five = example_plans()
    assert [p.settings.method for p in seven.plans] == ["full", "lora", "qlora"]
    assert seven.full_bytes_per_param == pytest.approx(16.0)
    assert sixty_five.plans[-1].total < GPU_48GB < sixty_five.plans[1].total


# --- activations -----------------------------------------------------------------------------


def saved_bytes(model: torch.nn.Module, batch: int, seq: int) -> int:
    """Bytes of the distinct non-parameter tensors autograd keeps for backward."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(3, model.config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, ids, torch.ones_like(ids), ids)
    return sum(seen.values())


def prepared(layers, method, dtype, checkpointing):
    model = small_llama(layers, dtype=dtype)
    if method == "lora":
        splice.attach(model, splice.LoRAConfig(rank=4, target_modules="all-linear"))
    else:
        model.requires_grad_(True)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_activations_equal_what_autograd_keeps(method, dtype, checkpointing):
    """Two more blocks keep exactly two blocks' worth of the formula (the layer-independent
    part cancels)."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    batch, seq = 2, 12
    one = saved_bytes(prepared(1, method, torch_dtype, checkpointing), batch, seq)
    three = saved_bytes(prepared(3, method, torch_dtype, checkpointing), batch, seq)
    shape = shape_from_model(small_llama(1))
    settings = PlanSettings(method=method, dtype=dtype)
    per_block = (shape.hidden * (2 if dtype == "bf16" else 4) if checkpointing
                 else block_bytes_per_token(shape, settings))
    assert three - one == 2 * per_block * batch * seq


def test_activations_grow_linearly_with_tokens_and_checkpointing_cuts_them():
    shape = shape_from_preset("7B")
    # (from 2,048 tokens on, a block's backward outweighs the loss's fixed-size logits chunk)
    a = [plan_memory(shape, "lora", batch=b, seq=512).activations for b in (4, 8, 16)]
    assert a[2] - a[1] == 2 * (a[1] - a[0])
    ckpt = plan_memory(shape, "lora", batch=16, seq=512, grad_checkpointing=True)
    assert ckpt.activations < a[2] / 5


# --- the API ---------------------------------------------------------------------------------


def test_plan_all_methods_gives_plain_dataclasses_in_order(tmp_path):
    plans = plan_all_methods(shape_from_preset("135M", "smollm2"), rank=8, batch=2, seq=64)
    assert [p.settings.method for p in plans] == ["full", "lora", "qlora"]
    assert all(isinstance(p, MemoryPlan) for p in plans)
    record = asdict(plans[1])
    assert record["settings"]["rank"] == 8 and isinstance(record["total"], int)
    full, lora, qlora = plans
    assert qlora.frozen_weights < lora.frozen_weights and lora.total < full.total
    assert qlora.trainable_params == lora.trainable_params
    png = plot_plans(plans, tmp_path / "plan.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("field,value,match", [
    ("method", "dora", "--method 'dora'"), ("optimizer", "sgd", "--optimizer 'sgd'"),
    ("dtype", "fp16", "--dtype 'fp16'"), ("batch", 0, "--batch 0"), ("targets", " ", "--targets")])
def test_settings_name_the_bad_flag(field, value, match):
    with pytest.raises(ConfigError, match=match):
        PlanSettings(**{field: value})


def test_total_is_the_larger_phase_not_the_sum():
    plan = plan_memory(shape_from_preset("135M", "smollm2"), "full", dtype="fp32", batch=4, seq=128)
    resident = plan.trainable_weights + plan.optimizer_state
    assert plan.total >= resident + plan.activations
    assert plan.total >= resident + plan.gradients
    assert plan.total < plan.sum_of_parts   # gradients and activations never peak together

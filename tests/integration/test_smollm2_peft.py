"""SmolLM2-135M-Instruct (fp32, 30 layers, tied embeddings) against peft, on a real chat prompt.

Deep copies of the 540 MB model dominate the run time, so module-scoped fixtures share the
expensive states; no test modifies the session `smollm2` model or a shared fixture's model.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import splice
from helpers import logits, randomize_adapter
from splice.core.layer import adapter_layers

pytestmark = pytest.mark.integration

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_PARAMETERS = 134_515_008
# r·(d_in + d_out) per projection, hidden 576, kv 3×64 = 192, MLP 1536, 30 layers:
# (2·8·1152 + 2·8·768 + 3·8·2112)·30
LORA_R8_PARAMETERS = 2_442_240
ATOL = 1e-5
MERGE_ATOL = 2e-4  # see test_merge_unmerge_and_merge_and_unload


@pytest.fixture(scope="module")
def prompt(smollm2) -> torch.Tensor:
    _, tokenizer = smollm2
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    return encoded["input_ids"]


@pytest.fixture(scope="module")
def base_logits(smollm2, prompt) -> torch.Tensor:
    return logits(smollm2[0], prompt)


@pytest.fixture(scope="module")
def trained(smollm2, prompt, tmp_path_factory) -> SimpleNamespace:
    """A copy with an all-linear r=8 adapter: its logits at attach, then with random B, saved."""
    model = copy.deepcopy(smollm2[0])
    splice.attach(model, splice.LoRAConfig(rank=8, target_modules="all-linear"))
    at_attach = logits(model, prompt)
    randomize_adapter(model, seed=0, scale=0.05)
    folder = splice.save_adapter(model, tmp_path_factory.mktemp("smollm2-adapter"))
    return SimpleNamespace(model=model, at_attach=at_attach, logits=logits(model, prompt),
                           folder=folder)


def test_fresh_all_linear_adapter_is_bit_identical_to_the_base(trained, base_logits):
    assert torch.equal(trained.at_attach, base_logits)
    # ...and the trained one is not (so the comparison above can fail).
    assert not torch.allclose(trained.logits, base_logits, atol=1e-2)


def test_all_linear_wraps_the_seven_projections_and_trains_2442240(trained):
    kinds = {path.rsplit(".", 1)[-1] for path, _ in adapter_layers(trained.model)}
    assert kinds == set(PROJECTIONS)  # the tied lm_head is not a target
    assert len(list(adapter_layers(trained.model))) == 7 * 30
    count = splice.count_trainable(trained.model)
    assert count.trainable == LORA_R8_PARAMETERS
    assert count.total == BASE_PARAMETERS + LORA_R8_PARAMETERS


def test_count_trainable_for_the_seven_named_projections(smollm2):
    # Same architecture on the meta device: parameter counts without copying any weights.
    with torch.device("meta"):
        model = LlamaForCausalLM(smollm2[0].config)
    assert splice.count_trainable(model).total == BASE_PARAMETERS  # tied head counted once
    splice.attach(model, splice.LoRAConfig(rank=8, target_modules=list(PROJECTIONS)))
    count = splice.count_trainable(model)
    assert (count.trainable, count.total) == (LORA_R8_PARAMETERS, BASE_PARAMETERS + LORA_R8_PARAMETERS)


def test_our_adapter_loads_in_peft_with_equal_logits(smollm2, trained, prompt):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(smollm2[0]), trained.folder).eval()
    torch.testing.assert_close(logits(peft_model, prompt), trained.logits, atol=ATOL, rtol=0)


QV = ["q_proj", "v_proj"]
PEFT_MADE = {
    "plain": dict(r=8, lora_alpha=16, target_modules=QV),
    "rslora": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=QV),
    "patterns": dict(r=8, lora_alpha=16, target_modules=QV,
                     rank_pattern={"q_proj": 4, "layers.7.self_attn.v_proj": 2},
                     alpha_pattern={"q_proj": 3, "layers.7.self_attn.v_proj": 11}),
    # SmolLM2 ties lm_head to embed_tokens: a saved copy of either would untie them, which peft
    # handles with extra machinery (modules_to_tie / ensure_weight_tying) splice does not mirror.
    # The final norm and one layer's MLP norm are untied modules, so the comparison is clean.
    "modules-to-save": dict(r=8, target_modules=QV,
                            modules_to_save=["model.norm", "layers.3.post_attention_layernorm"]),
}


def test_peft_made_adapters_load_with_equal_logits(smollm2, base_logits, prompt, tmp_path):
    from peft import LoraConfig, get_peft_model

    # One peft model holding every case as a named adapter, one splice copy loading each folder:
    # two deep copies instead of eight.
    names = list(PEFT_MADE)
    peft_model = get_peft_model(copy.deepcopy(smollm2[0]), LoraConfig(**PEFT_MADE[names[0]]),
                                adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, LoraConfig(**PEFT_MADE[name]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, param in peft_model.named_parameters():
            if "lora_" in param_name or "modules_to_save" in param_name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    peft_model.save_pretrained(tmp_path)  # adapters not named "default" go to tmp_path/<name>
    peft_model.eval()

    ours = copy.deepcopy(smollm2[0])
    for name in names:
        splice.load_adapter(ours, tmp_path / name, name)
    for name in names:
        peft_model.set_adapter(name)
        expected = logits(peft_model, prompt)
        assert not torch.allclose(expected, base_logits, atol=1e-3), name
        splice.set_active_adapters(ours, name)
        torch.testing.assert_close(logits(ours, prompt), expected, atol=ATOL, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_merge_unmerge_and_merge_and_unload(smollm2, trained, prompt, tmp_path):
    base = smollm2[0]
    model = copy.deepcopy(base)
    splice.load_adapter(model, trained.folder)

    splice.merge_adapter(model)
    # fp32 through 30 layers: x·(W + ΔW) rounds differently from W·x + s·B·(A·x). With logits up
    # to ~39 the difference is ~1.1e-4, and peft's merge of this very adapter gives the same
    # logits as ours to the bit, so the bound is 2e-4 (5e-6 of the logit range), not 1e-4.
    torch.testing.assert_close(logits(model, prompt), trained.logits, atol=MERGE_ATOL, rtol=0)

    splice.unmerge_adapter(model)
    base_params = dict(base.named_parameters())
    for path, layer in adapter_layers(model):
        restored, original = layer.base_layer.weight, base_params[f"{path}.weight"]
        assert not torch.equal(layer.delta_weight("default"), torch.zeros_like(restored))
        assert (restored - original).norm() <= 1e-6 * original.norm(), path

    plain = splice.merge_and_unload(model)
    assert type(plain) is LlamaForCausalLM
    assert sum(p.numel() for p in plain.parameters()) == BASE_PARAMETERS
    assert not list(adapter_layers(plain))
    merged_logits = logits(plain, prompt)
    torch.testing.assert_close(merged_logits, trained.logits, atol=MERGE_ATOL, rtol=0)

    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is LlamaForCausalLM
    assert reloaded.model.embed_tokens.weight is reloaded.lm_head.weight  # still tied
    torch.testing.assert_close(logits(reloaded, prompt), merged_logits, atol=1e-6, rtol=0)

"""Saving an adapter whose init left the base a residual: converted for the untouched base
(rank 2r), equal to the trained model there in splice and in peft, and equal to peft's own
conversion; PiSSA and OLoRA A, B and residual equal peft's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import logits, randomize_adapter, token_ids

import splice
from splice.core.io import read_adapter_weights
from splice.inits.data import attach_with_data

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def trained(model, init: str, **config):
    """`model` with an adapter started by `init` and then moved off its start."""
    config = splice.LoRAConfig(rank=4, init=init, target_modules=TARGETS, **config)
    if init == "lora_ga":
        ids = token_ids(model, batch=2, length=8)
        attach_with_data(model, config, [{"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                          "labels": ids}])
    else:
        splice.attach(model, config)
    randomize_adapter(model, scale=0.05)
    return model


@pytest.mark.parametrize("init,config", [("pissa", {}), ("olora", {}), ("lora_ga", {}),
                                         ("pissa", {"use_rslora": True, "alpha": 6})])
def test_converted_save_applies_to_the_untouched_base(init, config, tiny_llama, tmp_path):
    original = copy.deepcopy(tiny_llama)
    model = trained(tiny_llama, init, **config)
    ids = token_ids(model)
    expected = logits(model, ids)
    splice.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(2 * 8 if not config else 6 * 2 ** 0.5)
    fresh = copy.deepcopy(original)
    splice.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, ids), expected, atol=1e-5, rtol=0)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(in_peft(ids).logits, expected, atol=1e-5, rtol=0)


def test_unconverted_save_is_the_raw_adapter(tiny_llama, tmp_path):
    model = trained(tiny_llama, "pissa")
    splice.save_adapter(model, tmp_path, convert=False)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["init_lora_weights"] == "pissa"
    layer = model.model.layers[0].self_attn.q_proj
    weights = read_adapter_weights(tmp_path)
    assert torch.equal(weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                       layer.lora_A["default"].weight)


def test_an_adapter_that_kept_the_base_saves_as_it_is(tiny_llama, tmp_path):
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, init="gaussian", target_modules=TARGETS))
    splice.save_adapter(tiny_llama, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 4


def peft_model(model, init: str):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_b_and_residual_equal_peft(init, tiny_llama):
    ours = copy.deepcopy(tiny_llama)
    splice.attach(ours, splice.LoRAConfig(rank=4, alpha=8, init=init, target_modules=TARGETS))
    theirs = peft_model(tiny_llama, init)
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        mine, peft_layer = ours.get_submodule(path), theirs.base_model.model.get_submodule(path)
        for key in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(mine, key)["default"].weight,
                                       getattr(peft_layer, key)["default"].weight, atol=1e-5, rtol=0)
        torch.testing.assert_close(mine.base_layer.weight, peft_layer.base_layer.weight, atol=1e-5, rtol=0)


def test_converted_file_equals_peft_conversion(tiny_llama, tmp_path):
    ours = copy.deepcopy(tiny_llama)
    splice.attach(ours, splice.LoRAConfig(rank=4, alpha=8, init="pissa", target_modules=TARGETS))
    theirs = peft_model(tiny_llama, "pissa")
    # peft's recipe: save the initial adapter as a plain one, train, save with the conversion
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(str(tmp_path / "initial"))
    theirs.peft_config["default"].init_lora_weights = "pissa"
    randomize_adapter(ours, scale=0.05)
    with torch.no_grad():  # the same trained values on both sides
        for path, layer in ours.named_modules():
            if hasattr(layer, "initial_updates"):
                peft_layer = theirs.base_model.model.get_submodule(path)
                for key in ("lora_A", "lora_B"):
                    getattr(peft_layer, key)["default"].weight.copy_(getattr(layer, key)["default"].weight)
    theirs.save_pretrained(str(tmp_path / "peft"),
                           path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    splice.save_adapter(ours, tmp_path / "ours")
    mine, peft_file = read_adapter_weights(tmp_path / "ours"), read_adapter_weights(tmp_path / "peft")
    assert mine.keys() == peft_file.keys()
    for key, value in mine.items():
        torch.testing.assert_close(value, peft_file[key], atol=1e-6, rtol=0)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert our_config[key] == peft_config[key], key

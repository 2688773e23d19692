"""Bad input fails loudly, says what is wrong, and leaves the model exactly as it was."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import splice
from helpers import assert_same_snapshot, logits, randomize_adapter, snapshot, token_ids

QV = ["q_proj", "v_proj"]


@pytest.fixture
def saved(tiny_llama, tmp_path):
    """A valid, non-trivial adapter folder made from a copy of tiny_llama."""
    model = copy.deepcopy(tiny_llama)
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules=QV))
    randomize_adapter(model)
    folder = splice.save_adapter(model, tmp_path / "adapter")
    return folder, model


def edit_config(folder, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def assert_load_fails(model, folder, error, match, **kwargs):
    before = snapshot(model)
    with pytest.raises(error, match=match) as info:
        splice.load_adapter(model, folder, **kwargs)
    assert_same_snapshot(before, snapshot(model))
    return info.value


# -- targets --------------------------------------------------------------------------------------

def test_target_modules_matching_nothing_lists_the_linear_layers(tiny_llama):
    before = snapshot(tiny_llama)
    with pytest.raises(splice.TargetError) as info:
        splice.attach(tiny_llama, splice.LoRAConfig(target_modules=["query", "value"]))
    message = str(info.value)
    assert "['query', 'value']" in message or "('query', 'value')" in message
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in message
    assert_same_snapshot(before, snapshot(tiny_llama))


def test_regex_matching_nothing_is_an_error(tiny_gpt2):
    before = snapshot(tiny_gpt2)
    with pytest.raises(splice.TargetError, match="c_attn"):
        splice.attach(tiny_gpt2, splice.LoRAConfig(target_modules=r".*\.q_proj"))
    assert_same_snapshot(before, snapshot(tiny_gpt2))


def test_modules_to_save_naming_nothing_is_an_error(tiny_llama):
    before = snapshot(tiny_llama)
    with pytest.raises(splice.TargetError, match="modules_to_save.*classifier"):
        splice.attach(tiny_llama, splice.LoRAConfig(target_modules=QV, modules_to_save=["classifier"]))
    assert_same_snapshot(before, snapshot(tiny_llama))


# -- shapes that do not fit -----------------------------------------------------------------------

def mismatch_in(message: str, file_shapes: dict, model_shapes: dict) -> str:
    """The key the message names; it must be a real key, quoted with both of its shapes."""
    key = re.search(r"'(base_model\.model\.[^']+)'", message).group(1)
    assert key in file_shapes
    assert str(file_shapes[key]) in message and str(model_shapes[key]) in message
    assert file_shapes[key] != model_shapes[key]
    return key


def test_adapter_from_a_wider_model_names_the_key_and_both_shapes(saved):
    folder, small = saved
    torch.manual_seed(0)
    wide = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, tie_word_embeddings=False)).eval()
    error = assert_load_fails(wide, folder, splice.AdapterError, "shape")
    file_shapes = {k: tuple(v.shape) for k, v in splice.core.keys.adapter_tensors(small, "default").items()}
    probe = copy.deepcopy(wide)
    splice.attach(probe, splice.LoRAConfig(rank=4, target_modules=QV))
    model_shapes = {k: tuple(v.shape) for k, v in splice.core.keys.adapter_tensors(probe, "default").items()}
    mismatch_in(str(error), file_shapes, model_shapes)


def test_rank_in_config_not_matching_the_tensors_names_the_key_and_both_shapes(saved, tiny_llama):
    folder, model = saved
    edit_config(folder, r=2)
    error = assert_load_fails(tiny_llama, folder, splice.AdapterError, "shape")
    file_shapes = {k: tuple(v.shape) for k, v in splice.core.keys.adapter_tensors(model, "default").items()}
    model_shapes = {k: (2, s[1]) if ".lora_A." in k else (s[0], 2) for k, s in file_shapes.items()}
    mismatch_in(str(error), file_shapes, model_shapes)


def test_file_missing_a_tensor_the_config_implies(saved, tiny_llama):
    folder, _ = saved
    edit_config(folder, target_modules=["q_proj", "v_proj", "k_proj"])
    assert_load_fails(tiny_llama, folder, splice.AdapterError, r"lacks .*k_proj")


def test_file_key_for_a_module_the_model_lacks(saved, tiny_llama):
    folder, _ = saved
    edit_config(folder, target_modules=["q_proj"])
    assert_load_fails(tiny_llama, folder, splice.AdapterError, r"v_proj.*matches nothing")


def test_file_carrying_an_untargeted_base_weight_is_refused(saved, tiny_llama):
    """An adapter file may not overwrite arbitrary base weights (only biases / targeted tables)."""
    from safetensors.torch import load_file, save_file
    folder, _ = saved
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, folder / "adapter_model.safetensors")
    assert_load_fails(tiny_llama, folder, splice.AdapterError, r"up_proj.weight.*matches nothing")


# -- unsafe and broken files ----------------------------------------------------------------------

def test_pickle_only_folder_is_refused_and_never_unpickled(saved, tiny_llama, monkeypatch):
    folder, model = saved
    weights = {k: v.detach().clone() for k, v in splice.core.keys.adapter_tensors(model, "default").items()}
    (folder / "adapter_model.safetensors").unlink()
    torch.save(weights, folder / "adapter_model.bin")
    calls = []

    def no_unpickling(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load must never be called on an adapter file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    error = assert_load_fails(tiny_llama, folder, splice.AdapterFileError, "adapter_model.bin")
    assert "never unpickles" in str(error)
    assert "safetensors" in str(error)  # says how to convert it
    assert calls == []


def test_missing_folder(tiny_llama, tmp_path):
    error = assert_load_fails(tiny_llama, tmp_path / "nope", splice.AdapterFileError, "does not exist")
    assert "nope" in str(error)


def test_folder_without_adapter_config(saved, tiny_llama):
    folder, _ = saved
    (folder / "adapter_config.json").unlink()
    assert_load_fails(tiny_llama, folder, splice.AdapterFileError, "no adapter_config.json")


def test_folder_without_weights(saved, tiny_llama):
    folder, _ = saved
    (folder / "adapter_model.safetensors").unlink()
    assert_load_fails(tiny_llama, folder, splice.AdapterFileError, "no adapter_model.safetensors")


def test_config_that_is_not_json(saved, tiny_llama):
    folder, _ = saved
    (folder / "adapter_config.json").write_text("{not json")
    assert_load_fails(tiny_llama, folder, splice.AdapterFileError, "not valid JSON")


def test_corrupt_safetensors_file(saved, tiny_llama):
    folder, _ = saved
    path = folder / "adapter_model.safetensors"
    path.write_bytes(torch.randint(0, 256, (path.stat().st_size,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    assert_load_fails(tiny_llama, folder, splice.AdapterFileError, "corrupt or truncated")


def test_truncated_safetensors_file(saved, tiny_llama):
    folder, _ = saved
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_load_fails(tiny_llama, folder, splice.AdapterFileError, "corrupt or truncated")


def test_truncated_file_on_a_model_with_an_adapter_leaves_that_adapter_alone(saved, tiny_llama):
    folder, _ = saved
    splice.attach(tiny_llama, splice.LoRAConfig(rank=2, target_modules=["q_proj"]), "first")
    randomize_adapter(tiny_llama, "first")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    assert_load_fails(tiny_llama, folder, splice.AdapterFileError, "corrupt or truncated", name="second")


# -- adapter_config.json content ------------------------------------------------------------------

def test_unknown_config_keys_warn_and_the_load_still_works(saved, tiny_llama):
    folder, model = saved
    edit_config(folder, some_future_option=3, another_one="x")
    with pytest.warns(UserWarning, match=r"another_one.*some_future_option"):
        splice.load_adapter(tiny_llama, folder)
    ids = token_ids(model)
    torch.testing.assert_close(logits(tiny_llama, ids), logits(model, ids), atol=0, rtol=0)


def test_unknown_peft_type_is_refused(saved, tiny_llama):
    folder, _ = saved
    edit_config(folder, peft_type="LOHA")
    error = assert_load_fails(tiny_llama, folder, splice.AdapterFileError, "LOHA")
    assert "not supported" in str(error) and "LORA" in str(error)


def test_missing_peft_type_is_refused(saved, tiny_llama):
    folder, _ = saved
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    del data["peft_type"]
    path.write_text(json.dumps(data))
    assert_load_fails(tiny_llama, folder, splice.AdapterFileError, "peft_type")


@pytest.mark.parametrize("file_key,value,field", [
    ("r", 0, "rank"), ("lora_alpha", -1, "alpha"), ("lora_dropout", 1.0, "dropout"),
    ("bias", "some", "bias"), ("init_lora_weights", 0.5, "init")])
def test_invalid_values_in_the_file_are_config_errors(saved, tiny_llama, file_key, value, field):
    folder, _ = saved
    edit_config(folder, **{file_key: value})
    assert_load_fails(tiny_llama, folder, splice.ConfigError, rf"\b{field}\b")


# -- config values --------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("rank", 0), ("rank", -1), ("rank", 2.5), ("rank", True), ("rank", "8"),
    ("alpha", 0), ("alpha", -1), ("alpha", math.nan), ("alpha", math.inf), ("alpha", True),
    ("dropout", -0.1), ("dropout", 1.0), ("dropout", "0.1"),
    ("init", "kaiming"), ("init", "corda"), ("bias", "some"), ("bias", None),
    ("layers_to_transform", [-1]), ("target_modules", "(unclosed"),
])
def test_invalid_config_values_raise_config_error_naming_the_field(field, value):
    with pytest.raises(splice.ConfigError, match=rf"^{field}\b"):
        splice.LoRAConfig(**{"target_modules": QV, field: value})


@pytest.mark.parametrize("field,value", [("rank_pattern", {"q_proj": 0}),
                                         ("alpha_pattern", {"q_proj": math.inf})])
def test_invalid_pattern_values_name_the_pattern_entry(field, value):
    with pytest.raises(splice.ConfigError, match=rf"^{field}\['q_proj'\]"):
        splice.LoRAConfig(target_modules=QV, **{field: value})


def test_config_error_is_a_value_error():
    assert issubclass(splice.ConfigError, ValueError)


# -- adapter names --------------------------------------------------------------------------------

def test_duplicate_adapter_name_is_refused(tiny_llama, saved):
    folder, _ = saved
    splice.attach(tiny_llama, splice.LoRAConfig(rank=2, target_modules=["q_proj"]))
    randomize_adapter(tiny_llama)
    before = snapshot(tiny_llama)
    with pytest.raises(splice.AdapterError, match="already has an adapter named 'default'"):
        splice.attach(tiny_llama, splice.LoRAConfig(rank=2, target_modules=["k_proj"]))
    assert_same_snapshot(before, snapshot(tiny_llama))
    assert_load_fails(tiny_llama, folder, splice.AdapterError, "already has an adapter named")


@pytest.mark.parametrize("name", ["a.b", "../x", "a/b", "", "__base__", 3])
def test_invalid_adapter_names_are_refused(tiny_llama, saved, name):
    folder, _ = saved
    before = snapshot(tiny_llama)
    with pytest.raises(splice.AdapterError, match="adapter name .* is invalid"):
        splice.attach(tiny_llama, splice.LoRAConfig(target_modules=QV), name)
    assert_same_snapshot(before, snapshot(tiny_llama))
    assert_load_fails(tiny_llama, folder, splice.AdapterError, "is invalid", name=name)


@pytest.mark.parametrize("name", ["double", "train", "keys"])
def test_adapter_names_that_shadow_module_attributes_are_refused_cleanly(tiny_llama, name):
    with pytest.raises(splice.AdapterError, match="module attribute"):
        splice.attach(tiny_llama, splice.LoRAConfig(rank=2, target_modules=["q_proj"]), name)
    assert splice.list_adapters(tiny_llama) in ({}, [])

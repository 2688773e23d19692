"""Model shapes: presets against published parameter counts, configs and models against counts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from splice.config.base import ConfigError
from splice.plan import ModelShape, preset_names, shape_from_config, shape_from_model, shape_from_preset

# Parameter counts published with the models (their model cards / papers).
PUBLISHED = {("llama", "7B"): 6_738_415_616, ("llama", "13B"): 13_015_864_320,
             ("llama", "65B"): 65_285_660_672, ("llama2", "70B"): 68_976_648_192,
             ("llama3", "8B"): 8_030_261_248, ("llama3", "1B"): 1_235_814_400,
             ("smollm2", "135M"): 134_515_008}


@pytest.mark.parametrize("arch,size", sorted(PUBLISHED))
def test_presets_have_the_published_parameter_counts(arch, size):
    assert shape_from_preset(size, arch).params == PUBLISHED[arch, size]


def test_preset_sizes_are_case_insensitive_and_listed():
    assert shape_from_preset("65b") == shape_from_preset("65B", "llama")
    assert "65B" in preset_names("llama")["llama"] and "smollm2" in preset_names()


def test_unknown_presets_name_the_choices():
    with pytest.raises(ConfigError, match="choose one of 1B, 7B, 13B, 33B, 65B"):
        shape_from_preset("8B", "llama")
    with pytest.raises(ConfigError, match="not a known family"):
        shape_from_preset("7B", "gpt5")


@pytest.mark.parametrize("tied", [False, True])
def test_shape_from_model_counts_the_models_parameters(tiny_llama, tied):
    config = LlamaConfig(vocab_size=100, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                         tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    shape = shape_from_model(model)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.kv_dim, shape.q_dim, shape.tied) == (32, 96, tied)
    paths = {name.removesuffix(".weight") for name, _ in model.named_parameters()}
    assert {m.path for m in shape.modules() if m.kind != "head" or not tied} <= paths


def test_shape_from_config_reads_a_llama_config(tiny_llama):
    shape = shape_from_config(tiny_llama.config)
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads,
            shape.vocab, shape.tied, shape.head_dim) == (32, 64, 2, 4, 2, 128, False, 8)


def test_other_layouts_are_refused(tiny_gpt2):
    with pytest.raises(ConfigError, match="llama-style"):
        shape_from_model(tiny_gpt2)


def test_shape_validation_names_the_field():
    with pytest.raises(ConfigError, match="kv_heads"):
        ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=3, vocab=10, tied=True)
    with pytest.raises(ConfigError, match="ModelShape.layers"):
        ModelShape(hidden=64, intermediate=128, layers=0, heads=4, kv_heads=2, vocab=10, tied=True)


@pytest.mark.integration
def test_smollm2_shape_from_the_real_model(smollm2):
    model, _ = smollm2
    shape = shape_from_model(model)
    assert shape.params == 134_515_008
    assert replace(shape, name="") == replace(shape_from_preset("135M", "smollm2"), name="")

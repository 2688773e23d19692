"""`adapter.method` reaches every registered method through one generic mapping."""

from __future__ import annotations

import pytest

import splice
from splice.config.base import ConfigError
from splice.config.train import TRAIN_METHODS, AdapterSection
from splice.core.registry import METHODS
from splice.train.run import adapter_config


def test_train_methods_are_the_registry_plus_qlora_and_full():
    assert set(TRAIN_METHODS) == set(METHODS) | {"qlora", "full"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_builds_its_config_with_its_defaults(method):
    config = adapter_config(AdapterSection(method=method))
    assert type(config) is METHODS[method].config_cls


def test_section_fields_reach_the_config_and_foreign_fields_are_ignored():
    lora = adapter_config(AdapterSection(method="qlora", rank=4, alpha=8, dropout=0.1, targets="q_proj,v_proj"))
    assert isinstance(lora, splice.LoRAConfig) and lora.rank == 4 and lora.alpha == 8
    assert lora.target_modules == ("q_proj", "v_proj") and lora.dropout == 0.1
    assert adapter_config(AdapterSection(method="dora")).target_modules == "all-linear"
    prompt = adapter_config(AdapterSection(method="prompt", num_virtual_tokens=7, rank=99))
    assert prompt.num_virtual_tokens == 7
    adapter = adapter_config(AdapterSection(method="adapter", bottleneck_size=12, placement="pfeiffer"))
    assert (adapter.bottleneck_size, adapter.placement) == (12, "pfeiffer")


def test_an_unknown_method_names_the_choices():
    with pytest.raises(ConfigError, match="ia3"):
        AdapterSection(method="lokr")

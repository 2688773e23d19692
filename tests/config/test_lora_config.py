"""LoRAConfig: defaults, scaling closed forms, per-module patterns, immutability, peft dicts."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

import splice
from splice.config import LoRAConfig, help_for

QV = ("q_proj", "v_proj")


@pytest.mark.parametrize("rank", [1, 4, 8, 16, 64])
def test_alpha_defaults_to_twice_the_rank(rank):
    config = LoRAConfig(rank=rank, target_modules=QV)
    assert config.alpha == 2 * rank
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 2.0


def test_explicit_alpha_is_kept():
    assert LoRAConfig(rank=8, alpha=32, target_modules=QV).alpha == 32
    assert LoRAConfig(rank=8, alpha=0.5, target_modules=QV).alpha == 0.5


@pytest.mark.parametrize("rank,alpha", [(1, 1), (4, 8), (8, 16), (16, 8), (64, 16), (7, 3.5)])
def test_scaling_is_alpha_over_rank(rank, alpha):
    config = LoRAConfig(rank=rank, alpha=alpha, target_modules=QV)
    assert config.scaling_for("q_proj") == pytest.approx(alpha / rank, rel=1e-12)


@pytest.mark.parametrize("rank,alpha", [(1, 1), (4, 8), (16, 8), (64, 16), (256, 16)])
def test_rslora_scaling_is_alpha_over_root_rank(rank, alpha):
    config = LoRAConfig(rank=rank, alpha=alpha, use_rslora=True, target_modules=QV)
    assert config.scaling_for("q_proj") == pytest.approx(alpha / math.sqrt(rank), rel=1e-12)
    # rsLoRA's point (Kalajdzievski 2023): the update's scale does not vanish as rank grows.
    assert config.scaling_for("q_proj") * math.sqrt(rank) == pytest.approx(alpha)


def test_rslora_uses_the_pattern_rank_and_alpha():
    config = LoRAConfig(rank=8, alpha=16, use_rslora=True, target_modules=QV,
                        rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 6})
    assert config.scaling_for("model.layers.0.self_attn.v_proj") == pytest.approx(6 / 2)
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(16 / math.sqrt(8))


Q0 = "model.layers.0.self_attn.q_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"
V11 = "model.layers.11.self_attn.v_proj"
DOWN3 = "model.layers.3.mlp.down_proj"
NOT_Q = "model.layers.0.self_attn.xq_proj"  # 'q_proj' is a substring but not a dotted suffix

# (patterns, module path, expected rank); default rank 8
PATTERN_TABLE = [
    ({"q_proj": 2}, Q0, 2),                                     # short name = dotted suffix
    ({"q_proj": 2}, NOT_Q, 8),                                  # not a suffix after a dot
    ({"self_attn.q_proj": 2}, Q1, 2),                           # longer suffix
    ({"layers.1.self_attn.v_proj": 3}, V1, 3),                  # layer-specific key
    ({"layers.1.self_attn.v_proj": 3}, V11, 8),                 # ...does not hit layer 11
    ({"model.layers.1.self_attn.v_proj": 3}, V1, 3),            # the full path
    ({r"layers\.[0-2]\.self_attn\.(q|v)_proj": 5}, V1, 5),      # regex
    ({r"layers\.[0-2]\.self_attn\.(q|v)_proj": 5}, V11, 8),
    ({r".*mlp\..*": 6}, DOWN3, 6),
    ({"q_proj": 2, "layers.0.self_attn.q_proj": 3}, Q0, 2),     # first match wins...
    ({"layers.0.self_attn.q_proj": 3, "q_proj": 2}, Q0, 3),     # ...in insertion order
    ({"layers.0.self_attn.q_proj": 3, "q_proj": 2}, Q1, 2),
    ({}, Q0, 8),
]


@pytest.mark.parametrize("patterns,path,expected", PATTERN_TABLE)
def test_rank_and_alpha_pattern_resolution(patterns, path, expected):
    config = LoRAConfig(rank=8, alpha=16, target_modules=QV, rank_pattern=patterns,
                        alpha_pattern={k: 10 * v for k, v in patterns.items()})
    assert config.rank_for(path) == expected
    # Alpha patterns resolve the same way (no pattern in the table maps to the default 8).
    assert config.alpha_for(path) == (16 if expected == 8 else 10 * expected)


@pytest.mark.parametrize("patterns,path,expected", PATTERN_TABLE)
def test_pattern_resolution_agrees_with_peft(patterns, path, expected):
    from peft.utils.other import get_pattern_key  # the oracle: peft's own lookup

    key = get_pattern_key(list(patterns), path)
    assert patterns.get(key, 8) == LoRAConfig(rank=8, target_modules=QV,
                                             rank_pattern=patterns).rank_for(path)


def test_config_is_frozen():
    config = LoRAConfig(rank=4, target_modules=QV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.target_modules = ("k_proj",)
    assert config.rank == 4 and config.target_modules == QV


def test_lists_become_tuples_and_replace_revalidates():
    config = LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 1])
    assert config.target_modules == QV and config.layers_to_transform == (0, 1)
    assert config.replace(rank=16).rank == 16
    with pytest.raises(splice.ConfigError, match="rank"):
        config.replace(rank=0)


ROUND_TRIP = [
    LoRAConfig(rank=4, target_modules=QV),
    LoRAConfig(rank=16, alpha=8, dropout=0.1, use_rslora=True, init="gaussian", bias="lora_only",
               target_modules="all-linear"),
    LoRAConfig(rank=8, target_modules=r".*\.(q|v)_proj", layers_to_transform=(0, 2),
               layers_pattern=("layers",), modules_to_save=("lm_head",)),
    LoRAConfig(rank=8, alpha=16.5, target_modules=QV, bias="all", fan_in_fan_out=True,
               rank_pattern={"q_proj": 2, "layers.1.self_attn.v_proj": 3},
               alpha_pattern={"q_proj": 5.0}),
]


@pytest.mark.parametrize("config", ROUND_TRIP, ids=range(len(ROUND_TRIP)))
def test_peft_dict_round_trip_through_json(config):
    data = json.loads(json.dumps(config.to_peft_dict()))
    assert LoRAConfig.from_peft_dict(data) == config


def test_peft_dict_uses_peft_names_and_values():
    data = LoRAConfig(rank=4, alpha=8, dropout=0.05, init="gaussian", target_modules=("v_proj", "q_proj"),
                      layers_to_transform=[1]).to_peft_dict()
    assert data["peft_type"] == "LORA"
    assert (data["r"], data["lora_alpha"], data["lora_dropout"]) == (4, 8, 0.05)
    assert data["init_lora_weights"] == "gaussian"
    assert data["target_modules"] == ["q_proj", "v_proj"]  # a list, sorted
    assert data["layers_to_transform"] == [1]
    assert data["use_dora"] is False
    assert not {"rank", "alpha", "dropout", "init"} & set(data)
    assert LoRAConfig(rank=4, target_modules=QV).to_peft_dict()["init_lora_weights"] is True


def test_peft_dict_builds_a_peft_config():
    from peft import LoraConfig

    data = LoRAConfig(rank=4, alpha=8, use_rslora=True, target_modules=QV,
                      rank_pattern={"q_proj": 2}).to_peft_dict()
    peft_config = LoraConfig(**{k: v for k, v in data.items() if k != "peft_type"})
    assert (peft_config.r, peft_config.lora_alpha, peft_config.use_rslora) == (4, 8, True)
    assert set(peft_config.target_modules) == set(QV) and peft_config.rank_pattern == {"q_proj": 2}


@pytest.mark.parametrize("init_value", [True, False, "pissa", "olora"])
def test_peft_inits_that_only_matter_at_creation_load_as_default(init_value):
    data = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "init_lora_weights": init_value}
    assert LoRAConfig.from_peft_dict(data).init == "default"


def test_peft_default_keys_do_not_warn_but_unknown_ones_do(recwarn):
    data = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "qalora_group_size": 16,
            "use_qalora": False, "peft_version": "0.21.2", "megatron_core": "megatron.core",
            "loftq_config": {}, "exclude_modules": None}
    assert LoRAConfig.from_peft_dict(data).rank == 4
    assert not [w for w in recwarn if "adapter config" in str(w.message)]
    with pytest.warns(UserWarning, match="use_qalora"):
        LoRAConfig.from_peft_dict({**data, "use_qalora": True})


def test_every_field_has_help_text():
    for f in dataclasses.fields(LoRAConfig):
        text = f.metadata.get("help", "")
        assert isinstance(text, str) and len(text.strip()) > 10, f.name
        assert help_for(LoRAConfig, f.name) == text
    with pytest.raises(KeyError):
        help_for(LoRAConfig, "not_a_field")

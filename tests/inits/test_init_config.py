"""The init fields of LoRAConfig: validation, peft's spelling on file, the converted config."""

from __future__ import annotations

import math
import warnings

import pytest

from splice.config.base import ConfigError
from splice.config.lora import InitOptions, LoRAConfig


@pytest.mark.parametrize("options,field", [({"pissa_niter": -1}, "pissa_niter"),
                                           ({"loftq_bits": 3}, "loftq_bits"),
                                           ({"loftq_iterations": 0}, "loftq_iterations"),
                                           ({"eva_rho": 0.5}, "eva_rho"),
                                           ({"lora_ga_gamma": 0}, "lora_ga_gamma"),
                                           ({"rho": 2}, "unknown")])
def test_bad_init_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        LoRAConfig(init="pissa", init_options=options)


def test_unknown_init_lists_the_choices():
    with pytest.raises(ConfigError, match="lora_ga"):
        LoRAConfig(init="corda")


@pytest.mark.parametrize("init,options,on_file", [
    ("default", {}, True), ("gaussian", {}, "gaussian"), ("pissa", {}, "pissa"),
    ("pissa", {"pissa_niter": 4}, "pissa_niter_4"), ("olora", {}, "olora"), ("loftq", {}, "loftq"),
    ("eva", {}, True), ("lora_ga", {}, True)])
def test_init_as_peft_spells_it(init, options, on_file):
    data = LoRAConfig(rank=4, init=init, init_options=options, target_modules=["q_proj"]).to_peft_dict()
    assert data["init_lora_weights"] == on_file
    assert "init_options" not in data
    if init == "loftq":
        assert data["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}


def test_files_load_as_plain_lora_without_warnings():
    data = LoRAConfig(rank=4, init="loftq", target_modules=["q_proj"]).to_peft_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = LoRAConfig.from_peft_dict(data)
    assert loaded.init == "default" and loaded.init_options == InitOptions()


@pytest.mark.parametrize("rslora", [False, True])
def test_the_converted_config_doubles_ranks_and_keeps_the_scale(rslora):
    config = LoRAConfig(rank=4, alpha=6, init="pissa", use_rslora=rslora, target_modules=["q_proj"],
                        rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3.0})
    plain = config.converted_to_plain()
    assert (plain.rank, plain.rank_for("x.v_proj"), plain.init) == (8, 4, "default")
    for path in ("a.q_proj", "a.v_proj"):
        assert math.isclose(plain.scaling_for(path), config.scaling_for(path))

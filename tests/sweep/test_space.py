"""The sweep's space file: every bad knob or value is an error that names it and what is allowed;
good files become typed knobs; the attn / mlp target presets select the right layers; a trial's
knobs land where `splice train` reads them."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

import splice
from splice.config import lora as lora_config
from splice.config.base import ConfigError, TARGET_PRESETS, parse_targets
from splice.config.train import build_train_config
from splice.core.layer import adapter_layers
from splice.sweep.objective import train_values
from splice.sweep.space import KNOBS, Knob, load_space, parse_space

ROOT = Path(__file__).resolve().parents[2]


def error(data) -> str:
    with pytest.raises(ConfigError) as info:
        parse_space(data, source="s.yaml")
    return str(info.value)


def test_an_unknown_knob_is_named_with_the_knobs_there_are():
    message = error({"space": {"rnak": [4, 8]}})
    assert "'rnak'" in message and "did you mean 'rank'" in message
    assert ", ".join(KNOBS) in message


@pytest.mark.parametrize("knob, value, allowed", [
    ("method", "lorax", "lora, dora, qlora"),
    ("targets", "attention", "all-linear, attn, mlp"),
    ("rslora", "yes", "false, true"),
])
def test_an_unknown_value_is_named_with_the_allowed_ones(knob, value, allowed):
    message = error({"space": {knob: [value]}})
    assert f"space.{knob}" in message and repr(value) in message and f"allowed: {allowed}" in message


def test_init_values_come_from_the_lora_inits_at_run_time(monkeypatch):
    message = error({"space": {"init": ["nonsense"]}})
    assert "allowed: " + ", ".join(lora_config.LORA_INITS) in message
    monkeypatch.setattr(lora_config, "LORA_INITS", lora_config.LORA_INITS + ("nonsense",))
    assert parse_space({"space": {"init": ["nonsense"]}}).knobs[0].choices == ("nonsense",)


@pytest.mark.parametrize("data, needle", [
    ({"space": {"rank": [0]}}, "space.rank: 0 is not a positive integer"),
    ({"space": {"rank": [2.5]}}, "space.rank: 2.5 is not a positive integer"),
    ({"space": {"lr": {"low": 1e-2, "high": 1e-4}}}, "low (0.01) must be below high (0.0001)"),
    ({"space": {"lr": {"low": 0, "high": 1}}}, "space.lr: 0 is not a positive number"),
    ({"space": {"method": {"low": 1, "high": 2}}}, "takes a list of values, not a range"),
    ({"space": {"rank": []}}, "space.rank is an empty list"),
    ({"sampler": "grid", "space": {"lr": {"low": 1e-4, "high": 1e-2}}},
     "the grid sampler needs a list of values for lr"),
    ({"space": {"alpha": [8], "alpha_ratio": [2]}}, "give alpha or alpha_ratio"),
    ({"samplr": "tpe", "space": {"rank": [4]}}, "unknown key 'samplr' (did you mean 'sampler'?)"),
    ({"sampler": "bayes", "space": {"rank": [4]}}, "choose one of tpe, random, grid"),
    ({"pruner": "hyperband", "space": {"rank": [4]}}, "choose one of median, none"),
    ({"sampler": "tpe"}, "a 'space' section naming at least one knob is required"),
])
def test_bad_files_say_what_is_wrong(data, needle):
    assert needle in error(data)


def test_a_good_file_becomes_typed_knobs():
    space = parse_space({"sampler": "tpe", "eval_every": 5, "space": {
        "rank": {"low": 2, "high": 32, "log": True}, "lr": {"low": "1e-4", "high": 1e-2, "log": True},
        "alpha_ratio": 2, "rslora": [False, True]}})
    assert space.knobs == (Knob("rank", low=2, high=32, log=True), Knob("lr", low=1e-4, high=1e-2, log=True),
                           Knob("alpha_ratio", choices=(2.0,)), Knob("rslora", choices=(False, True)))
    assert space.eval_every == 5 and space.sampler == "tpe"
    assert isinstance(space.knobs[0].low, int)
    grid = parse_space({"sampler": "grid", "space": {"rank": [4, 8], "targets": ["attn", "mlp"]}})
    assert grid.grid() == {"rank": [4, 8], "targets": ["attn", "mlp"]} and grid.grid_size() == 4


def test_the_example_space_file_is_valid():
    space = load_space(ROOT / "sweeps" / "demo.yaml")
    assert {k.name for k in space.knobs} >= {"method", "rank", "targets", "lr", "init", "rslora"}
    text = (ROOT / "sweeps" / "demo.yaml").read_text()
    assert text.startswith("#") and "splice sweep" in text.splitlines()[2]


def adapted(model: nn.Module, targets: str) -> set[str]:
    splice.attach(model, splice.LoRAConfig(rank=2, target_modules=parse_targets(targets)))
    return {path for path, _ in adapter_layers(model)}


def linear_paths(model: nn.Module, parents: tuple[str, ...]) -> set[str]:
    """Reference: the linear layers whose parent module is one of `parents` (by name)."""
    return {path for path, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))
            and path.split(".")[-2:-1] and path.split(".")[-2] in parents}


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_attn_and_mlp_presets_adapt_the_attention_and_feed_forward_linears(fixture, request):
    model = request.getfixturevalue(fixture)
    attn, mlp, every = (adapted(copy.deepcopy(model), t) for t in ("attn", "mlp", "all-linear"))
    assert attn == linear_paths(model, ("self_attn", "attn")) and attn
    assert mlp == linear_paths(model, ("mlp",)) and mlp
    assert attn | mlp == every and not attn & mlp
    assert all(re.fullmatch(TARGET_PRESETS["attn"], p) for p in attn)


def test_a_trials_knobs_land_where_splice_train_reads_them(tmp_path):
    base = {"model": "m", "data": {"path": "t.jsonl", "eval_path": "e.jsonl"},
            "adapter": {"rank": 16}, "train": {"steps": 5}}
    params = {"method": "dora", "rank": 8, "alpha_ratio": 2.0, "targets": "attn", "lr": 3e-3,
              "init": "gaussian", "rslora": True, "dropout": 0.1}
    config = build_train_config(train_values(base, params, tmp_path / "t", eval_every=2))
    a = config.adapter
    assert (a.method, a.rank, a.alpha, a.targets, a.init, a.use_rslora, a.dropout) == (
        "dora", 8, 16.0, "attn", "gaussian", True, 0.1)
    assert (config.train.lr, config.train.steps, config.train.eval_every) == (3e-3, 5, 2)
    assert config.output == str(tmp_path / "t") and base["adapter"] == {"rank": 16}  # base untouched
    fixed_rank = build_train_config(train_values(base, {"alpha_ratio": 0.5}, tmp_path, 1))
    assert fixed_rank.adapter.alpha == 8.0  # 0.5 x the base's rank 16

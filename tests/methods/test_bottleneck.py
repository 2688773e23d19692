"""Bottleneck adapters against their closed form, y = h + W_up·act(W_down·h + b_down) + b_up with
h the wrapped module's output, recomputed densely from the tensors. No peft counterpart: the file
format is splice's own (documented in splice.methods.bottleneck), checked key by key here."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import splice
from helpers import assert_same_snapshot, logits, randomize_adapter, snapshot, token_ids
from splice.config.bottleneck import BottleneckConfig
from splice.core.layer import adapter_layers
from splice.methods.bottleneck import BottleneckLinear

KINDS = ["llama", "gpt2"]
# Module paths inside one block that each placement adapts (2 blocks in the tiny models).
PLACED = {
    ("houlsby", "llama"): {"self_attn.o_proj", "mlp.down_proj"},
    ("houlsby", "gpt2"): {"attn.c_proj", "mlp.c_proj"},
    ("pfeiffer", "llama"): {"mlp.down_proj"},
    ("pfeiffer", "gpt2"): {"mlp.c_proj"},
}
REFERENCE_ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "silu": lambda z: z * torch.sigmoid(z)}


@pytest.fixture
def models(tiny_llama, tiny_gpt2):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}


def block_paths(model) -> set[str]:
    return {path.split(".", 3)[-1] for path, _ in adapter_layers(model)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_placement_picks_the_modules_and_a_fresh_adapter_is_the_base(placement, kind, models):
    model = models[kind]
    ids = token_ids(model)
    expected = logits(model, ids)
    splice.attach(model, BottleneckConfig(placement=placement, bottleneck_size=8))
    assert block_paths(model) == PLACED[placement, kind]
    assert len(list(adapter_layers(model))) == 2 * len(PLACED[placement, kind])
    assert torch.equal(logits(model, ids), expected)
    # (d·m + m) down + (m·d + d) up per adapted module, d = 32 in both tiny models
    assert splice.count_trainable(model).trainable == 2 * len(PLACED[placement, kind]) * (
        2 * 32 * 8 + 8 + 32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_forward_is_the_closed_form(activation, kind, models):
    model = models[kind]
    splice.attach(model, BottleneckConfig(bottleneck_size=8, activation=activation))
    randomize_adapter(model, scale=0.3)
    act = REFERENCE_ACTIVATIONS[activation]
    generator = torch.Generator().manual_seed(2)
    for path, layer in adapter_layers(model):
        x = torch.randn(3, 5, layer.in_features, generator=generator)
        with torch.no_grad():
            h = layer.base_layer(x)                                             # (3, 5, d)
            down, up = layer.adapter_down["default"], layer.adapter_up["default"]
            z = act(h @ down.weight.T + down.bias)                              # (3, 5, m)
            expected = h + z @ up.weight.T + up.bias
            torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6, msg=path)
            assert not torch.allclose(layer(x), h, atol=1e-3)


def test_two_active_adapters_add_their_outputs(tiny_llama):
    splice.attach(tiny_llama, BottleneckConfig(bottleneck_size=8), "a")
    splice.attach(tiny_llama, BottleneckConfig(placement="pfeiffer", bottleneck_size=4,
                                               activation="silu"), "b")
    randomize_adapter(tiny_llama, "a", seed=0, scale=0.3)
    randomize_adapter(tiny_llama, "b", seed=1, scale=0.3)
    splice.set_active_adapters(tiny_llama, ["a", "b"])
    layer = tiny_llama.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = layer.base_layer(x)
        mlp = {n: layer.adapter_up[n](REFERENCE_ACTIVATIONS[act](layer.adapter_down[n](h)))
               for n, act in (("a", "relu"), ("b", "silu"))}
        torch.testing.assert_close(layer(x), h + mlp["a"] + mlp["b"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_tensors_get_gradients(kind, models):
    model = models[kind]
    splice.attach(model, BottleneckConfig(bottleneck_size=8))
    randomize_adapter(model, scale=0.3)
    ids = token_ids(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    adapter = {n for n, _ in model.named_parameters() if ".adapter_" in n}
    assert with_grad == adapter and len(adapter) == 4 * len(list(adapter_layers(model)))
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in adapter)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_refused_with_the_reason_and_changes_nothing(kind, models):
    model = models[kind]
    splice.attach(model, BottleneckConfig(bottleneck_size=8))
    randomize_adapter(model, scale=0.3)
    before = snapshot(model)
    for merge in (splice.merge_adapter, splice.merge_and_unload):
        with pytest.raises(splice.AdapterError, match="adds layers .* cannot be folded into a"):
            merge(model)
        assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact_and_the_file_is_as_documented(kind, models, tmp_path):
    base = models[kind]
    model = copy.deepcopy(base)
    config = BottleneckConfig(placement="pfeiffer", bottleneck_size=8, activation="gelu",
                              dropout=0.1)
    splice.attach(model, config)
    randomize_adapter(model, scale=0.3)
    ids = token_ids(model)
    splice.save_adapter(model, tmp_path)

    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "SPLICE_BOTTLENECK"
    assert {k: data[k] for k in ("placement", "bottleneck_size", "activation", "dropout")} == {
        "placement": "pfeiffer", "bottleneck_size": 8, "activation": "gelu", "dropout": 0.1}
    path = {"llama": "model.layers.0.mlp.down_proj", "gpt2": "transformer.h.0.mlp.c_proj"}[kind]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    prefix = f"base_model.model.{path}"
    assert {k: v for k, v in shapes.items() if k.startswith(prefix + ".")} == {
        f"{prefix}.adapter_down.weight": (8, 32), f"{prefix}.adapter_down.bias": (8,),
        f"{prefix}.adapter_up.weight": (32, 8), f"{prefix}.adapter_up.bias": (32,)}
    assert len(shapes) == 4 * 2

    loaded = splice.load_adapter(base, tmp_path)
    assert splice.list_adapters(loaded)["default"] == config
    assert isinstance(loaded.get_submodule(path), BottleneckLinear)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    # dropout is off in eval mode, on in training mode
    loaded.train()
    assert not torch.equal(logits(loaded, ids), logits(model, ids))


def test_peft_cannot_read_the_file(tiny_llama, tmp_path):
    """Expected: the format is splice's own. peft stops at the peft_type instead of misreading."""
    from peft import PeftModel
    model = copy.deepcopy(tiny_llama)
    splice.attach(model, BottleneckConfig(bottleneck_size=8))
    splice.save_adapter(model, tmp_path)
    with pytest.raises((KeyError, ValueError)):
        PeftModel.from_pretrained(tiny_llama, tmp_path)


def test_config_validation_names_the_problem():
    with pytest.raises(splice.ConfigError, match="placement='parallel'"):
        BottleneckConfig(placement="parallel")
    with pytest.raises(splice.ConfigError, match="activation='tanh'"):
        BottleneckConfig(activation="tanh")
    with pytest.raises(splice.ConfigError, match="bottleneck_size=0"):
        BottleneckConfig(bottleneck_size=0)
    with pytest.raises(splice.ConfigError, match="dropout=1.0"):
        BottleneckConfig(dropout=1.0)
    # explicit targets win over the placement
    assert BottleneckConfig(target_modules=["q_proj"]).target_modules == ("q_proj",)


@pytest.mark.integration
def test_smollm2_fresh_adapter_is_exactly_the_base(smollm2):
    base, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    expected = logits(base, ids)
    model = copy.deepcopy(base)
    splice.attach(model, BottleneckConfig())
    assert torch.equal(logits(model, ids), expected)
    # 30 blocks × 2 adapters × (576·64·2 + 64 + 576)
    assert splice.count_trainable(model).trainable == 60 * (2 * 576 * 64 + 64 + 576)
    randomize_adapter(model, scale=0.05)
    assert not torch.allclose(logits(model, ids), expected, atol=1e-2)

"""IA³ against its closed form (y = l ⊙ (W₀x + b₀), or W₀(l ⊙ x) + b₀) and against peft.

peft is the reference for the file format and the forward: its files load here, ours load there,
with the vectors perturbed away from 1 first so equal logits mean keys, shapes, sides
(feed-forward or not) and bias handling all agree. Tolerance 1e-5 absolute where two libraries
or a merged weight round differently; exact where the same arithmetic runs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import IA3Config as PeftIA3Config
from peft import PeftModel, get_peft_model

import splice
from helpers import logits, randomize_adapter, token_ids
from splice.config.ia3 import IA3Config
from splice.core.keys import adapter_tensors
from splice.core.layer import adapter_layers
from splice.methods.ia3 import IA3Linear

ATOL = 1e-5
KINDS = ["llama", "gpt2"]
# Module paths (inside one block) and sides the defaults pick: peft's defaults for each family.
DEFAULT_SIDES = {
    "llama": {"self_attn.k_proj": "out", "self_attn.v_proj": "out", "mlp.down_proj": "in"},
    "gpt2": {"attn.c_attn": "out", "mlp.c_proj": "in"},
}


@pytest.fixture
def models(tiny_llama, tiny_gpt2):
    """GPT-2's linear biases start at zero; give them values so bias handling shows in outputs."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in tiny_gpt2.named_parameters():
            if name.endswith(("c_attn.bias", "c_proj.bias", "c_fc.bias")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}


@torch.no_grad()
def perturb_vectors(model, seed=0, scale=0.1) -> None:
    """Move every ia3_l (splice's or peft's) away from 1 with seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "ia3_l" in name:
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def peft_made(base, folder, **kwargs):
    peft_model = get_peft_model(copy.deepcopy(base), PeftIA3Config(task_type="CAUSAL_LM", **kwargs))
    perturb_vectors(peft_model.eval())
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.mark.parametrize("kind", KINDS)
def test_default_targets_and_shapes_are_peft_defaults_and_start_as_the_base(kind, models):
    base = models[kind]
    ids = token_ids(base)
    expected = logits(base, ids)
    peft_model = get_peft_model(copy.deepcopy(base), PeftIA3Config(task_type="CAUSAL_LM"))
    peft_keys = {k: tuple(v.shape) for k, v in peft_model.state_dict().items() if "ia3_l" in k}
    splice.attach(base, IA3Config())
    ours = {k: tuple(v.shape) for k, v in adapter_tensors(base, "default").items()}
    # peft's model state dict carries the adapter name; its files drop it, as ours do.
    assert ours == {k.replace(".ia3_l.default", ".ia3_l"): s for k, s in peft_keys.items()}
    sides = {path.split(".", 3)[-1]: "in" if layer.feedforward["default"] else "out"
             for path, layer in adapter_layers(base)}
    assert sides == DEFAULT_SIDES[kind]
    for _, layer in adapter_layers(base):
        assert torch.equal(layer.ia3_l["default"], torch.ones_like(layer.ia3_l["default"]))
    assert torch.equal(logits(base, ids), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_the_closed_form(kind, models):
    """Each wrapped module against a dense recomputation from its base weight and vector."""
    model = models[kind]
    splice.attach(model, IA3Config())
    perturb_vectors(model)
    generator = torch.Generator().manual_seed(2)
    for path, layer in adapter_layers(model):
        x = torch.randn(3, 5, layer.in_features, generator=generator)
        weight = layer.base_layer.weight                            # (out, in), Conv1D (in, out)
        weight = weight.T if layer.fan_in_fan_out else weight
        bias = layer.base_layer.bias
        vector = layer.ia3_l["default"].detach().flatten()
        with torch.no_grad():
            if layer.feedforward["default"]:
                expected = (x * vector) @ weight.T + (0 if bias is None else bias)
            else:
                expected = (x @ weight.T + (0 if bias is None else bias)) * vector
            torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-6, msg=path)


@pytest.mark.parametrize("kind", KINDS)
def test_only_the_vectors_get_gradients(kind, models):
    model = models[kind]
    splice.attach(model, IA3Config())
    perturb_vectors(model)
    ids = token_ids(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    vectors = {n for n, _ in model.named_parameters() if n.endswith(".ia3_l.default")}
    assert with_grad == vectors and vectors
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in vectors)
    assert splice.count_trainable(model).trainable == sum(
        p.numel() for n, p in model.named_parameters() if n in vectors)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_unmerged_and_peft_merge_and_unmerge_restores_the_base(kind, models, tmp_path):
    base = models[kind]
    model = copy.deepcopy(base)
    splice.attach(model, IA3Config())
    perturb_vectors(model)
    ids = token_ids(model)
    unmerged = logits(model, ids)
    splice.save_adapter(model, tmp_path)
    splice.merge_adapter(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=ATOL, rtol=0)
    # The merged weights and biases (GPT-2's c_attn has one, and is scaled) are peft's.
    peft_merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).merge_and_unload()
    peft_state = peft_merged.state_dict()
    for path, layer in adapter_layers(model):
        for key, value in layer.base_layer.state_dict().items():
            torch.testing.assert_close(value, peft_state[f"{path}.{key}"], atol=1e-7, rtol=1e-6)
    splice.unmerge_adapter(model)
    base_state = base.state_dict()
    for path, layer in adapter_layers(model):
        for key, value in layer.base_layer.state_dict().items():
            original = base_state[f"{path}.{key}"]
            assert (value - original).norm() <= 1e-6 * original.norm(), f"{path}.{key}"
    torch.testing.assert_close(logits(model, ids), unmerged, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(kind, models, tmp_path):
    base = models[kind]
    model = copy.deepcopy(base)
    splice.attach(model, IA3Config())
    perturb_vectors(model)
    ids = token_ids(model)
    splice.save_adapter(model, tmp_path)
    splice.load_adapter(base, tmp_path)
    assert torch.equal(logits(base, ids), logits(model, ids))
    # and saving the loaded adapter writes the same config
    splice.save_adapter(base, tmp_path / "again")
    assert ((tmp_path / "again" / "adapter_config.json").read_text()
            == (tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("peft_kwargs", [
    {},
    {"target_modules": "all-linear"},
    {"target_modules": r".*\.(v_proj|down_proj|c_attn|c_proj)",
     "feedforward_modules": r".*\.(down_proj|c_proj)"},
], ids=["defaults", "all-linear", "regex"])
def test_peft_made_file_loads_with_equal_logits(kind, peft_kwargs, models, tmp_path):
    base = models[kind]
    peft_model = peft_made(base, tmp_path, **peft_kwargs)
    ids = token_ids(base)
    splice.load_adapter(base, tmp_path)
    assert isinstance(base.get_submodule(next(p for p, _ in adapter_layers(base))), IA3Linear)
    torch.testing.assert_close(logits(base, ids), logits(peft_model, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", [
    IA3Config(),
    IA3Config(target_modules="all-linear"),
    IA3Config(target_modules=("v_proj", "down_proj", "c_attn", "c_fc"), feedforward_modules=()),
    IA3Config(target_modules="all-linear", feedforward_modules=r".*\.(down_proj|c_proj)"),
], ids=["defaults", "all-linear", "outputs-only", "regex-ff"])
def test_our_file_loads_in_peft_with_equal_logits(kind, config, models, tmp_path):
    base = models[kind]
    model = copy.deepcopy(base)
    splice.attach(model, config)
    perturb_vectors(model)
    ids = token_ids(model)
    splice.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), atol=ATOL, rtol=0)


def test_peft_all_linear_file_goes_back_to_peft_through_splice(tiny_llama, tmp_path):
    """peft writes all-linear targets as full paths beside feed-forward names (down_proj), a
    pair its own reader rejects as "not a subset"; splice reads it and writes a pair both read."""
    peft_model = peft_made(tiny_llama, tmp_path / "peft", target_modules="all-linear")
    written = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.down_proj" in written["target_modules"]
    assert written["feedforward_modules"] == ["down_proj"]
    model = splice.load_adapter(copy.deepcopy(tiny_llama), tmp_path / "peft")
    splice.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())[
        "feedforward_modules"] == ".*(?:down_proj)"
    again = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "ours").eval()
    ids = token_ids(tiny_llama)
    expected = logits(peft_model.eval(), ids)
    torch.testing.assert_close(logits(again, ids), expected, atol=ATOL, rtol=0)


def test_two_active_adapters_multiply_as_in_peft(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    splice.attach(model, IA3Config(), "a")
    splice.attach(model, IA3Config(target_modules=("q_proj", "down_proj")), "b")
    randomize_adapter(model, "a", seed=0, scale=0.2)
    randomize_adapter(model, "b", seed=1, scale=0.2)
    for name in ("a", "b"):
        splice.save_adapter(model, tmp_path / name, name)
    splice.set_active_adapters(model, ["a", "b"])
    ids = token_ids(model)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "a",
                                           adapter_name="a")
    peft_model.load_adapter(tmp_path / "b", adapter_name="b")
    peft_model.base_model.set_adapter(["a", "b"])
    both = logits(model, ids)
    torch.testing.assert_close(both, logits(peft_model.eval(), ids), atol=ATOL, rtol=0)
    # merging both folds the product of the vectors into each weight
    splice.merge_adapter(model)
    torch.testing.assert_close(logits(model, ids), both, atol=ATOL, rtol=0)


def test_config_file_keys_are_peft_names(tiny_gpt2, tmp_path):
    splice.attach(tiny_gpt2, IA3Config(target_modules="all-linear"))
    folder = splice.save_adapter(tiny_gpt2, tmp_path)
    data = json.loads((folder / "adapter_config.json").read_text())
    assert data["peft_type"] == "IA3" and data["init_ia3_weights"] is True
    assert data["fan_in_fan_out"] is True                     # GPT-2's Conv1D, detected on attach
    assert data["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    # beside resolved names a list of feed-forward modules would not be a subset: a regex instead
    assert data["feedforward_modules"] == r".*(?:down_proj|mlp\.c_proj)"
    assert "layers_to_transform" not in data                # no such key in the IA3 format


def test_config_validation_names_the_problem():
    with pytest.raises(splice.ConfigError, match="must be among the targets"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(splice.ConfigError, match="regular expression"):
        IA3Config(feedforward_modules="(unclosed")
    # without feedforward_modules, the default ones among a list of targets
    assert IA3Config(target_modules=["c_attn", "mlp.c_proj"]).feedforward_modules == ("mlp.c_proj",)
    assert IA3Config(target_modules=["q_proj"]).feedforward_modules == ()
    # a suffix of a full-path target counts as among the targets
    full = IA3Config(target_modules=["model.layers.0.mlp.down_proj"],
                     feedforward_modules=["down_proj"])
    assert full.is_feedforward("model.layers.0.mlp.down_proj")
    assert not full.is_feedforward("model.layers.0.mlp.up_proj")


@pytest.mark.integration
def test_smollm2_starts_as_the_base_and_matches_peft(smollm2, tmp_path):
    base, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    expected = logits(base, ids)
    model = copy.deepcopy(base)
    splice.attach(model, IA3Config())
    assert torch.equal(logits(model, ids), expected)
    # 30 blocks × (k 192 + v 192 outputs + down 1536 inputs)
    assert splice.count_trainable(model).trainable == 30 * (192 + 192 + 1536)
    perturb_vectors(model)
    ours = logits(model, ids)
    assert not torch.allclose(ours, expected, atol=1e-2)
    splice.save_adapter(model, tmp_path / "ours")
    del model
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft_model, ids), ours, atol=ATOL, rtol=0)
    # and back: peft's file (the same vectors) loads here with the same logits
    peft_model.save_pretrained(tmp_path / "peft")
    del peft_model
    model = splice.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(model, ids), ours, atol=ATOL, rtol=0)

"""DoRA against its closed form and against peft (outputs, gradients, files), plus merging.

References: the dense formula y = (m/‖W₀ + s·BA‖) ⊙ (W₀ + s·BA)x + b with the norm detached,
computed with plain autograd; peft's DoRA (`use_dora=True`) for outputs, gradients and files.
Tolerances: 1e-5 absolute on logits (the same fp32 sums in a different order), 1e-5 relative to
the largest entry on gradients.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splice
from helpers import logits, randomize_adapter, token_ids
from splice.core.layer import adapter_layers
from splice.methods.dora import DoRALinear, row_norms

ATOL = 1e-5
GRAD_RTOL = 1e-5
SMOLLM2_ATOL = 1.5e-4  # see test_smollm2_zero_effect_init_and_peft_parity


@pytest.fixture
def models(tiny_llama, tiny_gpt2):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}


TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}


def peft_dora(base: nn.Module, kind: str, seed: int = 0, **kwargs):
    """A peft DoRA model (r=4, alpha=8) on a copy of `base`, with A, B and m perturbed."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], use_dora=True,
                        fan_in_fan_out=kind == "gpt2", **kwargs)
    model = get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def splice_dora(base: nn.Module, kind: str, **kwargs) -> nn.Module:
    model = copy.deepcopy(base)
    splice.attach(model, splice.DoRAConfig(rank=4, alpha=8, target_modules=TARGETS[kind], **kwargs))
    return model


def peft_grads(model) -> dict[str, torch.Tensor]:
    """peft's adapter gradients under splice's parameter names."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            name = name.removeprefix("base_model.model.")
            name = name.replace("lora_magnitude_vector.default.weight",
                                "lora_magnitude_vector.default")
            out[name] = param.grad
    return out


def assert_grads_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, grad in ours.items():
        scale = theirs[name].abs().max()
        assert scale > 0, name
        torch.testing.assert_close(grad, theirs[name], atol=GRAD_RTOL * scale, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


# -- step 0 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fresh_adapter_is_exactly_the_base(models, kind):
    base = models[kind]
    ids = token_ids(base)
    model = splice_dora(base, kind)
    assert torch.equal(logits(model, ids), logits(base, ids))
    for _, layer in adapter_layers(model):
        weight = layer.base_layer.weight
        rows = weight.T if layer.fan_in_fan_out else weight
        torch.testing.assert_close(layer.lora_magnitude_vector["default"], rows.norm(dim=1))


# -- peft parity ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_made_file_loads_with_equal_logits(models, kind, tmp_path):
    base = models[kind]
    ids = token_ids(base)
    theirs = peft_dora(base, kind).eval()
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs, ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)
    ours = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splice.load_adapter(ours, tmp_path)
    assert not [w for w in caught if "adapter config" in str(w.message)]
    assert isinstance(splice.list_adapters(ours)["default"], splice.DoRAConfig)
    torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_splice_made_file_loads_in_peft_with_equal_logits(models, kind, tmp_path):
    from peft import PeftModel

    base = models[kind]
    ids = token_ids(base)
    ours = splice_dora(base, kind)
    randomize_adapter(ours)
    expected = logits(ours, ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)
    splice.save_adapter(ours, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["use_dora"] is True and data["peft_type"] == "LORA"
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, ids), expected, atol=ATOL, rtol=0)


def test_file_keys_and_shapes_equal_peft(models, tmp_path):
    from safetensors import safe_open

    def shapes(folder):
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}

    peft_dora(models["llama"], "llama").save_pretrained(tmp_path / "peft")
    splice.save_adapter(splice_dora(models["llama"], "llama"), tmp_path / "splice")
    ours = shapes(tmp_path / "splice")
    assert ours == shapes(tmp_path / "peft")
    assert ours["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] == (32,)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_gradients_equal_peft(models, kind, tmp_path):
    base = models[kind]
    ids = token_ids(base)
    theirs = peft_dora(base, kind)
    theirs.save_pretrained(tmp_path)
    ours = splice.load_adapter(copy.deepcopy(base), tmp_path)
    for model in (theirs, ours):  # eval: GPT-2's own dropout off, so both see the same graph
        model.eval()
        model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in grads)
    assert_grads_close(grads, peft_grads(theirs))


def test_gradients_equal_peft_with_dropout_in_training(models, tmp_path):
    """With dropout the adapter reads dropout(x) and the base term W₀x stays; the masks match
    because both draw them in the same order from the same seed."""
    base = models["llama"]
    ids = token_ids(base)
    theirs = peft_dora(base, "llama", lora_dropout=0.3)
    theirs.save_pretrained(tmp_path)
    ours = splice.load_adapter(copy.deepcopy(base), tmp_path)
    losses = []
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(7)
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=ATOL, rtol=0)
    assert_grads_close({n: p.grad for n, p in ours.named_parameters() if p.requires_grad},
                       peft_grads(theirs))


# -- the closed form, on one layer ----------------------------------------------------------------

class Holder(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj


def dense_reference(x, weight, bias, adapters):
    """W₀x + b + Σₖ (W'ₖ − W₀)x with W'ₖ = mₖ ⊙ Vₖ / ‖Vₖ‖ (detached), Vₖ = W₀ + sₖBₖAₖ."""
    out = F.linear(x, weight, bias)
    for a, b, m, s in adapters:
        v = weight + s * b @ a                                            # (out, in)
        scale = m / v.norm(dim=1).detach()                                # (out,)
        out = out + F.linear(x, scale[:, None] * v - weight)
    return out


def one_layer(base_kind: str, bias: bool, names=("default",)) -> tuple[Holder, DoRALinear]:
    torch.manual_seed(0)
    if base_kind == "conv1d":
        from transformers.pytorch_utils import Conv1D
        proj = Conv1D(24, 16)  # (in=16, out=24)
        nn.init.normal_(proj.weight, std=0.2)
        nn.init.normal_(proj.bias, std=0.2)
    else:
        proj = nn.Linear(16, 24, bias=bias)
    model = Holder(proj)
    for name in names:
        splice.attach(model, splice.DoRAConfig(rank=3, alpha=5, target_modules=["proj"]), name)
        randomize_adapter(model, name, seed=len(name), scale=0.2)
    splice.set_active_adapters(model, list(names))
    return model, model.proj


def layer_tensors(layer: DoRALinear, name: str):
    return (layer.lora_A[name].weight, layer.lora_B[name].weight,
            layer.lora_magnitude_vector[name], layer.scaling[name])


def weight_out_in(layer: DoRALinear) -> torch.Tensor:
    w = layer.base_layer.weight
    return w.T if layer.fan_in_fan_out else w


@pytest.mark.parametrize("path", ["fused", "plain"])
@pytest.mark.parametrize("base_kind,bias", [("linear", False), ("linear", True), ("conv1d", True)])
def test_layer_output_and_gradients_match_the_closed_form(path, base_kind, bias):
    model, layer = one_layer(base_kind, bias)
    if path == "plain":  # a hook on the base makes the layer take the plain autograd path
        layer.base_layer.register_forward_pre_hook(lambda module, args: None)
    assert layer._fusable(torch.zeros(1, dtype=torch.float32), "default") == (path == "fused")
    base = layer.base_layer
    base.requires_grad_(True)  # the base may train too (bias="all", a full fine-tune)
    trained = [base.weight, *layer_tensors(layer, "default")[:3]] + ([base.bias] if bias else [])
    x = torch.randn(2, 5, 16, requires_grad=True)
    grad_out = torch.randn(2, 5, 24)

    y = layer(x)
    grads = torch.autograd.grad(y, [x, *trained], grad_out)
    expected = dense_reference(x, weight_out_in(layer), base.bias,
                               [layer_tensors(layer, "default")])
    expected_grads = torch.autograd.grad(expected, [x, *trained], grad_out)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base_kind,bias", [("linear", False), ("linear", True), ("conv1d", True)])
def test_fused_output_can_be_modified_in_place_and_backpropagates(base_kind, bias):
    model, layer = one_layer(base_kind, bias)
    x = torch.randn(2, 3, 16)
    y = layer(x)
    y.mul_(2)
    y.sum().backward()
    assert layer.lora_magnitude_vector["default"].grad.abs().sum() > 0


def test_two_adapters_add_their_deltas():
    model, layer = one_layer("linear", True, names=("first", "second"))
    x = torch.randn(4, 16)
    expected = dense_reference(x, layer.base_layer.weight, layer.base_layer.bias,
                               [layer_tensors(layer, n) for n in ("first", "second")])
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_row_norms_equal_the_dense_norm_even_where_the_update_cancels_the_row():
    torch.manual_seed(0)
    weight, a, b = torch.randn(12, 40), torch.randn(4, 40), torch.randn(12, 4) * 0.1
    scaling = 0.5
    # Row 3's update is -0.999·W₀ there: expanding the square alone would lose most digits.
    weight[3] = -0.999 * scaling * (b[3] @ a)
    dense = (weight.double() + scaling * b.double() @ a.double()).norm(dim=1)
    assert dense[3] < 2e-3 * weight[3].norm()
    torch.testing.assert_close(row_norms(weight, a, b, scaling).double(), dense, rtol=1e-5, atol=0)


def test_norms_are_computed_once_per_weight_version(monkeypatch):
    import splice.methods.dora as dora

    calls = []
    monkeypatch.setattr(dora, "row_norms", lambda *args: calls.append(1) or row_norms(*args))
    model, layer = one_layer("linear", True)
    a, b, m, s = layer_tensors(layer, "default")
    x = torch.randn(4, 16)

    def check():
        w, bias = layer.base_layer.weight, layer.base_layer.bias
        expected = dense_reference(x, w, bias, [layer_tensors(layer, "default")])
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        calls.clear()
        check()
        check()  # nothing changed: the norm is reused
        assert len(calls) == 1
        a.add_(0.3)  # as an optimizer step does: in place
        check()
        layer.base_layer.weight.mul_(1.5)
        check()
        b.mul_(-2)
        check()
        assert len(calls) == 4
        model.double()  # a cast gives new storages: recomputed in the new dtype
        x = x.double()
        check()
        assert len(calls) == 5


def test_training_after_inference_mode_forward():
    model, layer = one_layer("linear", False)
    x = torch.randn(4, 16)
    with torch.inference_mode():
        layer(x)
    layer(x).sum().backward()  # no inference-mode norm may be reused for the backward
    assert layer.lora_magnitude_vector["default"].grad.abs().sum() > 0


# -- merging --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_equals_unmerged_and_unmerge_restores_the_base(models, kind):
    base = models[kind]
    ids = token_ids(base)
    model = splice_dora(base, kind)
    randomize_adapter(model)
    expected = logits(model, ids)
    splice.merge_adapter(model)
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
    base_params = dict(base.named_parameters())
    for path, layer in adapter_layers(model):
        # The merged weight is W' = m ⊙ V / ‖V‖ itself: its rows have length m.
        merged = weight_out_in(layer)
        magnitude = layer.lora_magnitude_vector["default"].detach().abs()
        torch.testing.assert_close(merged.norm(dim=1), magnitude, atol=0, rtol=1e-5)
    splice.unmerge_adapter(model)
    for path, layer in adapter_layers(model):
        restored, original = layer.base_layer.weight, base_params[f"{path}.weight"]
        assert (restored - original).norm() <= 1e-6 * original.norm(), path
    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)


def test_merged_weight_equals_peft_merged_weight(models, tmp_path):
    base = models["llama"]
    theirs = peft_dora(base, "llama")
    theirs.save_pretrained(tmp_path)
    ours = splice.merge_and_unload(splice.load_adapter(copy.deepcopy(base), tmp_path))
    want = dict(theirs.merge_and_unload().named_parameters())
    for name, got in ours.named_parameters():
        torch.testing.assert_close(got, want[name], atol=1e-6, rtol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert not torch.equal(want["model.layers.0.self_attn.q_proj.weight"],
                           base.model.layers[0].self_attn.q_proj.weight)


def test_two_adapters_merge_one_by_one_and_partly():
    model, layer = one_layer("linear", True, names=("first", "second"))
    x = torch.randn(4, 16)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        splice.merge_adapter(model, ["first"])  # half merged: the second still runs unmerged
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        splice.merge_adapter(model, ["second"])
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        splice.unmerge_adapter(model)
        assert (layer.base_layer.weight - original).norm() <= 1e-6 * original.norm()
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_delta_weight_is_the_effective_change():
    model, layer = one_layer("conv1d", True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        change = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(x @ layer.delta_weight("default"), change, atol=1e-5, rtol=1e-5)


# -- config and routing ---------------------------------------------------------------------------

def test_config_round_trips_through_the_peft_dict():
    config = splice.DoRAConfig(rank=8, alpha=16, dropout=0.1, target_modules=("q_proj", "v_proj"))
    data = config.to_peft_dict()
    assert data["use_dora"] is True and data["r"] == 8 and data["peft_type"] == "LORA"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert splice.DoRAConfig.from_peft_dict(data) == config
    assert splice.LoRAConfig(rank=8).to_peft_dict()["use_dora"] is False


def test_lora_adapter_on_a_dora_module_is_refused_and_leaves_the_model_unchanged(models):
    model = splice_dora(models["llama"], "llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(splice.TargetError, match="one method per module"):
        splice.attach(model, splice.LoRAConfig(rank=2, target_modules=["q_proj"]), "other")
    assert list(splice.list_adapters(model)) == ["default"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- SmolLM2 --------------------------------------------------------------------------------------

@pytest.mark.integration
def test_smollm2_zero_effect_init_and_peft_parity(smollm2, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    base_logits = logits(base, ids)
    ours = copy.deepcopy(base)
    splice.attach(ours, splice.DoRAConfig(rank=8, target_modules="all-linear"))
    assert torch.equal(logits(ours, ids), base_logits)
    del ours

    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, use_dora=True,
                                                           target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    theirs.save_pretrained(tmp_path)
    expected = logits(theirs.eval(), ids)
    assert not torch.allclose(expected, base_logits, atol=1e-2)
    del theirs
    ours = splice.load_adapter(copy.deepcopy(base), tmp_path)
    # 30 fp32 layers, logits up to ~28: ~5e-5 apart (2e-6 of the range). The expanded norm and
    # the fused kernel's order of additions each account for about that much; the plain path
    # with a dense norm matches peft to the bit, so nothing but rounding differs.
    torch.testing.assert_close(logits(ours, ids), expected, atol=SMOLLM2_ATOL, rtol=0)

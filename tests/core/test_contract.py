"""The contract every registered method meets, on every tiny model it supports."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import splice
from helpers import (CASES, assert_same_snapshot, clone_model, logits, randomize_adapter, snapshot,
                     token_ids)

MATRIX = [(case, kind) for case in CASES for kind in case.kinds]
IDS = [f"{case.id}-{kind}" for case, kind in MATRIX]


@pytest.fixture
def base_model(request, tiny_llama, tiny_gpt2):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]


def attached(case, kind, model, randomize=True):
    base = clone_model(model)
    splice.attach(model, case.make_config(kind))
    if randomize:
        randomize_adapter(model)
    return base, model


pytestmark = pytest.mark.parametrize("case,base_model", [(c, k) for c, k in MATRIX],
                                     ids=IDS, indirect=["base_model"])


def kind_of(model) -> str:
    return "gpt2" if model.config.model_type == "gpt2" else "llama"


def test_fresh_adapter_is_exactly_the_base(case, base_model):
    if not case.fresh_is_base:
        pytest.skip("a fresh adapter of this method changes the output by design")
    ids = token_ids(base_model)
    expected = logits(base_model, ids)
    splice.attach(base_model, case.make_config(kind_of(base_model)))
    assert torch.equal(logits(base_model, ids), expected)


def test_trained_adapter_changes_output_and_disable_gives_base(case, base_model):
    ids = token_ids(base_model)
    expected = logits(base_model, ids)
    attached(case, kind_of(base_model), base_model)
    assert not torch.allclose(logits(base_model, ids), expected, atol=1e-4)
    with splice.disable_adapters(base_model):
        assert torch.equal(logits(base_model, ids), expected)
    assert not torch.allclose(logits(base_model, ids), expected, atol=1e-4)


def test_merge_equals_unmerged_and_unmerge_restores_base(case, base_model):
    if not case.mergeable:
        pytest.skip("method is not mergeable")
    base, model = attached(case, kind_of(base_model), base_model)
    ids = token_ids(model)
    unmerged = logits(model, ids)
    splice.merge_adapter(model)
    torch.testing.assert_close(logits(model, ids), unmerged, atol=case.merge_atol, rtol=0)
    splice.unmerge_adapter(model)
    base_state = base.state_dict()
    for path, layer in splice.core.layer.adapter_layers(model):
        for key, value in layer.base_layer.state_dict().items():
            original = base_state[f"{path}.{key}"]
            # Relative to the weight's norm: fp32 rounding of W + ΔW is not exactly reversible
            # element by element when |ΔW| >> |W|, but the matrix comes back to 1e-6.
            assert (value - original).norm() <= 1e-6 * original.norm(), f"{path}.{key}"


def test_only_adapter_parameters_get_gradients(case, base_model):
    _, model = attached(case, kind_of(base_model), base_model)
    ids = token_ids(model)
    model.train()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert splice.count_trainable(model).trainable > 0


def test_save_load_round_trip(case, base_model, tmp_path):
    base, model = attached(case, kind_of(base_model), base_model)
    ids = token_ids(model)
    splice.save_adapter(model, tmp_path)
    splice.load_adapter(base, tmp_path)
    torch.testing.assert_close(logits(base, ids), logits(model, ids), atol=case.roundtrip_atol, rtol=0)


def test_peft_loads_our_file_with_equal_logits(case, base_model, tmp_path):
    if not case.peft_compatible:
        pytest.skip("no peft counterpart")
    from peft import PeftModel
    base, model = attached(case, kind_of(base_model), base_model)
    ids = token_ids(model)
    splice.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    expected = logits(peft_model, ids)[:, case.peft_extra_positions:]
    torch.testing.assert_close(expected, logits(model, ids), atol=case.peft_atol, rtol=0)


def test_merge_and_unload_gives_a_plain_reloadable_model(case, base_model, tmp_path):
    if not case.mergeable:
        pytest.skip("method is not mergeable")
    base, model = attached(case, kind_of(base_model), base_model)
    ids = token_ids(model)
    expected = logits(model, ids)
    plain = splice.merge_and_unload(model)
    assert type(plain) is type(base)
    assert splice.count_trainable(plain).total == splice.count_trainable(base).total
    assert set(plain.state_dict()) == set(base.state_dict())
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, atol=case.merge_atol, rtol=0)


def test_failed_attach_leaves_model_unchanged(case, base_model):
    splice.attach(base_model, case.make_config(kind_of(base_model)), "first")
    randomize_adapter(base_model, "first")
    before = snapshot(base_model)
    bad = {"default": torch.zeros(1)}  # a weights mapping whose keys fit nothing
    with pytest.raises(splice.AdapterError):
        splice.attach(base_model, case.make_config(kind_of(base_model)), "second", weights=bad)
    assert_same_snapshot(before, snapshot(base_model))


def test_delete_last_adapter_restores_the_original_modules(case, base_model):
    before = snapshot(base_model)
    splice.attach(base_model, case.make_config(kind_of(base_model)))
    splice.delete_adapter(base_model, "default")
    assert_same_snapshot(before, snapshot(base_model))

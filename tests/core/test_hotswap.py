"""Hot-swap: another adapter's weights copied into an attached adapter's tensors, in place.

The reference is the new adapter loaded fresh (`splice.load_adapter` on a copy of the base):
after the swap the slot gives its logits, while every parameter keeps its identity and storage
and each module its scale, so a compiled model runs on without recompiling.
"""

from __future__ import annotations

import copy

import pytest
import torch

import splice
from helpers import assert_same_snapshot, randomize_adapter, snapshot, token_ids
from splice.core.keys import adapter_tensors
from splice.core.layer import adapter_layers

ATOL = 1e-5


def saved_adapter(base, folder, config, seed: int):
    """Save a non-zero adapter made on a copy of `base` to `folder`; return that model."""
    model = copy.deepcopy(base)
    splice.attach(model, config)
    randomize_adapter(model, seed=seed, scale=0.1)
    splice.save_adapter(model, folder)
    return model


def fresh_logits(base, folder, ids) -> torch.Tensor:
    model = copy.deepcopy(base)
    splice.load_adapter(model, folder)
    with torch.no_grad():
        return model(ids).logits


def slot_model(base, config):
    model = copy.deepcopy(base)
    splice.attach(model, config, "slot")
    randomize_adapter(model, "slot", seed=99, scale=0.1)
    return model


def live_tensors(model):
    return {n: (p, p.data_ptr(), p.requires_grad) for n, p in model.named_parameters()}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


SWAPS = {
    # slot config, new adapter's config
    "same-shape": (splice.LoRAConfig(rank=4, target_modules="all-linear"),
                   splice.LoRAConfig(rank=4, alpha=5, target_modules="all-linear")),
    "lower-rank-other-scale": (splice.LoRAConfig(rank=8, target_modules="all-linear"),
                               splice.LoRAConfig(rank=2, alpha=7, use_rslora=True,
                                                 target_modules="all-linear")),
    "fewer-modules-and-patterns": (
        splice.LoRAConfig(rank=8, target_modules="all-linear"),
        splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                          alpha_pattern={"q_proj": 3.0})),
    "embedding": (splice.LoRAConfig(rank=6, target_modules=["embed_tokens", "q_proj"]),
                  splice.LoRAConfig(rank=3, target_modules=["embed_tokens", "q_proj"])),
}


@pytest.mark.parametrize("case", SWAPS, ids=list(SWAPS))
def test_swapped_slot_gives_the_new_adapters_logits_in_the_same_tensors(case, tiny_llama, tmp_path):
    slot_config, new_config = SWAPS[case]
    base = tiny_llama
    saved_adapter(base, tmp_path / "new", new_config, seed=1)
    ids = token_ids(base)
    expected = fresh_logits(base, tmp_path / "new", ids)
    model = slot_model(base, slot_config)
    assert not torch.allclose(logits(model, ids), expected, atol=1e-3)
    tensors = live_tensors(model)
    scalings = {p: dict(layer.scaling) for p, layer in adapter_layers(model)}

    splice.hotswap_adapter(model, "slot", tmp_path / "new")

    torch.testing.assert_close(logits(model, ids), expected, atol=ATOL, rtol=0)
    after = live_tensors(model)
    assert after.keys() == tensors.keys()
    for name, (param, ptr, grad) in tensors.items():
        assert after[name][0] is param and after[name][1] == ptr and after[name][2] == grad, name
    assert {p: dict(layer.scaling) for p, layer in adapter_layers(model)} == scalings


def test_lower_rank_pads_with_zero_rows_and_columns(tiny_llama, tmp_path):
    saved_adapter(tiny_llama, tmp_path / "new", splice.LoRAConfig(rank=2, target_modules=["q_proj"]), 1)
    model = slot_model(tiny_llama, splice.LoRAConfig(rank=8, target_modules=["q_proj"]))
    splice.hotswap_adapter(model, "slot", tmp_path / "new")
    layer = model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["slot"].weight, layer.lora_B["slot"].weight   # (8, in), (out, 8)
    assert a.shape[0] == 8 and torch.count_nonzero(a[2:]) == 0 and torch.count_nonzero(b[:, 2:]) == 0
    assert torch.count_nonzero(a[:2]) > 0 and torch.count_nonzero(b[:, :2]) > 0


def test_bare_tensors_swap_in_at_the_slots_scale(tiny_llama, tmp_path):
    config = splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"])
    source = saved_adapter(tiny_llama, tmp_path / "new", config, seed=1)
    weights = {k: v.detach().clone() for k, v in adapter_tensors(source, "default").items()}
    ids = token_ids(tiny_llama)
    model = slot_model(tiny_llama, config)
    splice.hotswap_adapter(model, "slot", weights)
    torch.testing.assert_close(logits(model, ids), logits(source, ids), atol=ATOL, rtol=0)


def test_a_higher_rank_is_refused_naming_the_fix_and_changes_nothing(tiny_llama, tmp_path):
    saved_adapter(tiny_llama, tmp_path / "new", splice.LoRAConfig(rank=8, target_modules=["q_proj"]), 1)
    model = slot_model(tiny_llama, splice.LoRAConfig(rank=4, target_modules="all-linear"))
    before = snapshot(model)
    with pytest.raises(splice.AdapterError, match=r"rank 8 .* rank there is 4: create the slot "
                                                  r"with the largest rank"):
        splice.hotswap_adapter(model, "slot", tmp_path / "new")
    assert_same_snapshot(before, snapshot(model))


def test_a_module_the_slot_does_not_adapt_is_refused_and_changes_nothing(tiny_llama, tmp_path):
    saved_adapter(tiny_llama, tmp_path / "new",
                  splice.LoRAConfig(rank=4, target_modules=["q_proj", "down_proj"]), 1)
    model = slot_model(tiny_llama, splice.LoRAConfig(rank=4, target_modules=["q_proj"]))
    before = snapshot(model)
    with pytest.raises(splice.AdapterError, match="down_proj.*target_modules covering both"):
        splice.hotswap_adapter(model, "slot", tmp_path / "new")
    assert_same_snapshot(before, snapshot(model))


def test_another_method_is_refused(tiny_llama, tmp_path):
    saved_adapter(tiny_llama, tmp_path / "dora", splice.DoRAConfig(rank=4, target_modules=["q_proj"]), 1)
    model = slot_model(tiny_llama, splice.LoRAConfig(rank=4, target_modules=["q_proj"]))
    with pytest.raises(splice.AdapterError, match="dora adapter but 'slot' is a lora adapter"):
        splice.hotswap_adapter(model, "slot", tmp_path / "dora")


def test_a_merged_slot_is_refused(tiny_llama, tmp_path):
    config = splice.LoRAConfig(rank=4, target_modules=["q_proj"])
    saved_adapter(tiny_llama, tmp_path / "new", config, 1)
    model = slot_model(tiny_llama, config)
    splice.merge_adapter(model)
    with pytest.raises(splice.AdapterError, match="unmerge_adapter"):
        splice.hotswap_adapter(model, "slot", tmp_path / "new")


def test_dora_slots_swap_too(tiny_llama, tmp_path):
    """DoRA caches its weight norms between calls; the swap must reach them."""
    config = splice.DoRAConfig(rank=4, target_modules=["q_proj", "v_proj"])
    source = saved_adapter(tiny_llama, tmp_path / "new", config, seed=1)
    ids = token_ids(tiny_llama)
    model = slot_model(tiny_llama, config)
    logits(model, ids)                                   # fills the norm cache
    splice.hotswap_adapter(model, "slot", tmp_path / "new")
    torch.testing.assert_close(logits(model, ids), logits(source, ids), atol=ATOL, rtol=0)


def test_routed_batches_see_the_swapped_weights(tiny_llama, tmp_path):
    config = splice.LoRAConfig(rank=4, target_modules="all-linear")
    saved_adapter(tiny_llama, tmp_path / "new", config, seed=1)
    ids = token_ids(tiny_llama, batch=2)
    expected = fresh_logits(tiny_llama, tmp_path / "new", ids)
    model = slot_model(tiny_llama, config)
    rows = ["slot", splice.BASE_ADAPTER]
    with torch.no_grad():
        splice.forward_mixed(model, ids, rows)           # caches the stacks
        splice.hotswap_adapter(model, "slot", tmp_path / "new")
        mixed = splice.forward_mixed(model, ids, rows).logits
    torch.testing.assert_close(mixed[:1], expected[:1], atol=ATOL, rtol=0)


def test_a_compiled_model_runs_the_swapped_weights_without_recompiling(tiny_llama, tmp_path):
    dynamo = pytest.importorskip("torch._dynamo")
    from torch._dynamo.utils import counters

    slot_config, new_config = SWAPS["lower-rank-other-scale"]
    saved_adapter(tiny_llama, tmp_path / "new", new_config, seed=1)
    ids = token_ids(tiny_llama)
    expected = fresh_logits(tiny_llama, tmp_path / "new", ids)
    model = slot_model(tiny_llama, slot_config)
    dynamo.reset()
    counters.clear()
    # "eager": Dynamo's capture and guards without a code-generating backend (recompiles are
    # decided by the guards, whatever the backend)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        before = compiled(ids).logits
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        splice.hotswap_adapter(model, "slot", tmp_path / "new")
        with dynamo.config.patch(error_on_recompile=True):
            after = compiled(ids).logits
    assert counters["stats"]["unique_graphs"] == graphs
    assert not torch.allclose(before, expected, atol=1e-3)
    torch.testing.assert_close(after, expected, atol=ATOL, rtol=0)
    dynamo.reset()


# -- switching between loaded adapters ----------------------------------------------------------

def expected_trainable(model) -> set[str]:
    """The flags a full pass over every parameter gives (what a switch did before it was fast)."""
    from splice.core.attach import refresh_trainable

    reference = copy.deepcopy(model)
    for param in reference.parameters():
        param.requires_grad_(True)
    refresh_trainable(reference)
    return {n for n, p in reference.named_parameters() if p.requires_grad}


def test_switching_gives_the_flags_of_a_full_pass(tiny_gpt2):
    model = tiny_gpt2
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules=["c_attn"], bias="all"), "all-bias")
    splice.attach(model, splice.LoRAConfig(rank=2, target_modules=["c_attn", "c_fc"]), "b")
    splice.attach(model, splice.LoRAConfig(rank=2, target_modules=["c_proj"]), "c")
    for names in (["all-bias"], ["b"], ["b", "c"], ["all-bias", "c"], [], ["c"], ["all-bias"]):
        splice.set_active_adapters(model, names)
        assert splice.active_adapters(model) == names
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == expected_trainable(model), names
        assert any("bias" in n for n in trainable) == ("all-bias" in names)
        for path, layer in adapter_layers(model):
            assert layer.active_adapters == [n for n in names if layer.has_adapter(n)], path


def test_switching_reads_the_index_instead_of_walking_the_model(tiny_llama, monkeypatch):
    """A walk over every module is what made a switch cost ~0.2 s on SmolLM2 (bench/
    mixed_batch.py measures the switch); after the first switch none is needed."""
    import splice.core.attach as attach_module

    for name in "abc":
        splice.attach(tiny_llama, splice.LoRAConfig(rank=2, target_modules="all-linear"), name)
    splice.set_active_adapters(tiny_llama, "a")

    def walk(model):
        raise AssertionError("set_active_adapters walked the model")

    monkeypatch.setattr(attach_module, "adapter_layers", walk)
    monkeypatch.setattr(type(tiny_llama), "named_parameters", walk)
    for names in (["b"], ["c", "a"], ["a"]):
        splice.set_active_adapters(tiny_llama, names)
    monkeypatch.undo()
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert layer.active_adapters == ["a"]
    ids = token_ids(tiny_llama)
    randomize_adapter(tiny_llama, "a", seed=3)
    reference = copy.deepcopy(tiny_llama)
    splice.delete_adapter(reference, "b")          # a full rebuild of the activity
    splice.set_active_adapters(reference, "a")
    torch.testing.assert_close(logits(tiny_llama, ids), logits(reference, ids), atol=0, rtol=0)

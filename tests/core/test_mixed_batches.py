"""Mixed-adapter batches: one forward in which each row uses its own adapter (or the base).

The reference is each row run alone with its adapter active (`set_active_adapters`), or with
adapters disabled for a "__base__" row, and peft's own mixed-batch path (`adapter_names`) on the
same adapter files. Tolerance 1e-5 absolute on logits: the routed path folds the scale s into
B and sums in another order than the single-adapter path.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import splice
from helpers import randomize_adapter, token_ids
from splice.core.layer import adapter_layers

ATOL = 1e-5
BASE = splice.BASE_ADAPTER

# Three adapters of different ranks, scales and target modules (one adapts an embedding).
ADAPTERS = {
    "llama": {
        "a": splice.LoRAConfig(rank=2, target_modules="all-linear"),
        "b": splice.LoRAConfig(rank=8, alpha=3, target_modules=["q_proj", "v_proj"]),
        "c": splice.LoRAConfig(rank=4, use_rslora=True, target_modules=["embed_tokens", "o_proj"]),
    },
    "gpt2": {
        "a": splice.LoRAConfig(rank=2, target_modules="all-linear"),
        "b": splice.LoRAConfig(rank=8, alpha=3, target_modules=["c_attn"]),
        # wpe receives (1, T) position ids shared by every row of the batch
        "c": splice.LoRAConfig(rank=4, use_rslora=True, target_modules=["wpe", "wte", "c_fc"]),
    },
}
ROWS = ["a", BASE, "b", "c", "a", "c"]


@pytest.fixture(params=["llama", "gpt2"])
def adapted(request, tiny_llama, tiny_gpt2):
    """(kind, a model holding adapters a, b, c with non-zero weights; "a" active)."""
    kind = request.param
    model = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    for seed, (name, config) in enumerate(ADAPTERS[kind].items()):
        splice.attach(model, config, name, activate=False)
        randomize_adapter(model, name, seed=seed, scale=0.1)
    splice.set_active_adapters(model, "a")
    return kind, model


@torch.no_grad()
def row_alone(model: nn.Module, ids: torch.Tensor, name: str, **kwargs) -> torch.Tensor:
    """Logits of one row (1, T) run with adapter `name` alone (the base for "__base__")."""
    if name == BASE:
        with splice.disable_adapters(model):
            return model(ids, **kwargs).logits
    splice.set_active_adapters(model, name)
    return model(ids, **kwargs).logits


def test_mixed_batch_rows_equal_each_row_alone(adapted):
    _, model = adapted
    ids = token_ids(model, batch=len(ROWS), length=7)
    with torch.no_grad(), splice.adapter_routing(model, ROWS):
        mixed = model(ids).logits
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(mixed[i:i + 1], row_alone(model, ids[i:i + 1], name),
                                   atol=ATOL, rtol=0, msg=lambda m: f"row {i} ({name}): {m}")
    # each adapter changes its rows, so equal logits above prove each row got its own adapter
    base = row_alone(model, ids, BASE)
    for name in "abc":
        assert not torch.allclose(row_alone(model, ids, name), base, atol=1e-3), name


def test_forward_mixed_equals_the_routing_block(adapted):
    _, model = adapted
    ids = token_ids(model, batch=len(ROWS))
    with torch.no_grad():
        with splice.adapter_routing(model, ROWS):
            expected = model(ids).logits
        torch.testing.assert_close(splice.forward_mixed(model, ids, ROWS).logits, expected,
                                   atol=0, rtol=0)


def test_routing_leaves_the_active_adapters_and_normal_forward_alone(adapted):
    _, model = adapted
    ids = token_ids(model, batch=3)
    with torch.no_grad():
        before = model(ids).logits
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        layer_active = {p: list(layer.active_adapters) for p, layer in adapter_layers(model)}
        with splice.adapter_routing(model, ["b", "c", BASE]):
            model(ids)
            assert splice.active_adapters(model) == ["a"]
        assert {p: layer.active_adapters for p, layer in adapter_layers(model)} == layer_active
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert torch.equal(model(ids).logits, before)


def test_all_rows_on_one_adapter_equal_that_adapter_active(adapted):
    _, model = adapted
    ids = token_ids(model, batch=3)
    with torch.no_grad(), splice.adapter_routing(model, ["c"] * 3):
        mixed = model(ids).logits
    torch.testing.assert_close(mixed, row_alone(model, ids, "c"), atol=ATOL, rtol=0)


def test_all_rows_on_the_base_equal_the_base_exactly(adapted):
    _, model = adapted
    ids = token_ids(model, batch=2)
    with torch.no_grad(), splice.adapter_routing(model, [BASE, BASE]):
        mixed = model(ids).logits
    assert torch.equal(mixed, row_alone(model, ids, BASE))


def test_disable_adapters_inside_routing_gives_the_base(adapted):
    _, model = adapted
    ids = token_ids(model, batch=2)
    with torch.no_grad(), splice.adapter_routing(model, ["a", "b"]), splice.disable_adapters(model):
        mixed = model(ids).logits
    assert torch.equal(mixed, row_alone(model, ids, BASE))


def test_hot_changes_to_adapter_weights_reach_the_cached_stacks(adapted):
    """The stacks are cached between calls; an in-place change of a weight must show."""
    _, model = adapted
    ids = token_ids(model, batch=len(ROWS))
    with torch.no_grad():
        with splice.adapter_routing(model, ROWS):
            model(ids)                                   # builds and caches the stacks
        randomize_adapter(model, "b", seed=7, scale=0.2)
        with splice.adapter_routing(model, ROWS):
            mixed = model(ids).logits
    i = ROWS.index("b")
    torch.testing.assert_close(mixed[i:i + 1], row_alone(model, ids[i:i + 1], "b"), atol=ATOL, rtol=0)


def test_deleting_and_re_attaching_a_name_rebuilds_its_stacks(tiny_llama):
    model = tiny_llama
    config = splice.LoRAConfig(rank=4, target_modules=["q_proj"])
    splice.attach(model, config, "a")
    splice.attach(model, config, "b")
    randomize_adapter(model, "a", seed=0)
    randomize_adapter(model, "b", seed=1)
    ids = token_ids(model, batch=2)
    with torch.no_grad():
        splice.forward_mixed(model, ids, ["a", "b"])
        splice.delete_adapter(model, "b")
        splice.attach(model, config, "b")
        randomize_adapter(model, "b", seed=2)
        mixed = splice.forward_mixed(model, ids, ["a", "b"]).logits
    torch.testing.assert_close(mixed[1:], row_alone(model, ids[1:], "b"), atol=ATOL, rtol=0)


# -- generate ---------------------------------------------------------------------------------

def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_on_a_left_padded_mixed_batch_equals_each_row_alone(tiny_llama, beams):
    model = tiny_llama
    for seed, (name, config) in enumerate(ADAPTERS["llama"].items()):
        splice.attach(model, config, name)
        randomize_adapter(model, name, seed=seed, scale=0.3)
    prompts = [[5, 9, 17, 3, 44], [7, 1], [8, 8, 30], [60, 2, 2, 99]]
    names = ["b", "a", BASE, "c"]
    ids, mask = left_padded(prompts, pad=0)
    settings_ = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad(), splice.adapter_routing(model, names):
        mixed = model.generate(ids, attention_mask=mask, **settings_)[:, ids.shape[1]:]
    alone = []
    for prompt, name in zip(prompts, names):
        one = torch.tensor([prompt])
        with torch.no_grad():
            if name == BASE:
                with splice.disable_adapters(model):
                    out = model.generate(one, attention_mask=torch.ones_like(one), **settings_)
            else:
                splice.set_active_adapters(model, name)
                out = model.generate(one, attention_mask=torch.ones_like(one), **settings_)
        alone.append(out[0, one.shape[1]:].tolist())
    assert mixed.tolist() == alone
    assert len({tuple(row) for row in alone}) == len(alone)  # the adapters lead apart


# -- gradients ----------------------------------------------------------------------------------

def test_gradients_of_a_mixed_batch_equal_the_sum_over_rows_alone(adapted):
    """Training several adapters in one routed batch: activate them all so they require grad."""
    _, model = adapted
    names = ["a", "b", BASE, "c", "b"]
    ids = token_ids(model, batch=len(names), length=5)
    splice.set_active_adapters(model, ["a", "b", "c"])
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with splice.adapter_routing(model, names):
        model(ids).logits.pow(2).mean(-1).sum().backward()
    mixed = {n: p.grad.clone() for n, p in trained}
    reference = copy.deepcopy(model)
    reference.zero_grad(set_to_none=True)
    ref_params = dict(reference.named_parameters())
    for i, name in enumerate(names):
        if name == BASE:
            continue
        splice.set_active_adapters(reference, name)
        reference(ids[i:i + 1]).logits.pow(2).mean(-1).sum().backward()
    for n, grad in mixed.items():
        expected = ref_params[n].grad
        expected = torch.zeros_like(grad) if expected is None else expected
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for g in mixed.values())


# -- concurrency ----------------------------------------------------------------------------

def test_routing_is_per_call_not_shared_between_threads(tiny_llama):
    """One thread inside a routing block; another, running meanwhile, sees the active adapter."""
    model = tiny_llama
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules="all-linear"), "a")
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules="all-linear"), "b")
    randomize_adapter(model, "a", seed=0)
    randomize_adapter(model, "b", seed=1)
    splice.set_active_adapters(model, "a")
    ids = token_ids(model, batch=2)
    expected_plain = row_alone(model, ids, "a")
    splice.set_active_adapters(model, "a")
    inside, done = threading.Event(), threading.Event()
    results = {}

    def routed():
        with torch.no_grad(), splice.adapter_routing(model, ["b", "b"]):
            inside.set()
            done.wait(timeout=30)
            results["routed"] = model(ids).logits

    thread = threading.Thread(target=routed)
    thread.start()
    assert inside.wait(timeout=30)
    with torch.no_grad():
        results["plain"] = model(ids).logits       # while the other thread's block is open
    done.set()
    thread.join(timeout=60)
    assert torch.equal(results["plain"], expected_plain)
    torch.testing.assert_close(results["routed"], row_alone(model, ids, "b"), atol=ATOL, rtol=0)


# -- refusals ---------------------------------------------------------------------------------

def test_unknown_adapter_name_is_refused(adapted):
    _, model = adapted
    with pytest.raises(splice.AdapterError, match="no adapter named 'z'"):
        with splice.adapter_routing(model, ["a", "z"]):
            pass


def test_a_batch_of_another_size_is_refused(adapted):
    _, model = adapted
    ids = token_ids(model, batch=3)
    with pytest.raises(splice.AdapterError, match="one adapter name per row"):
        with torch.no_grad(), splice.adapter_routing(model, ["a", "b"]):
            model(ids)


def test_empty_or_string_names_are_refused(adapted):
    _, model = adapted
    for names in ([], "a"):
        with pytest.raises(splice.AdapterError, match="one adapter name per row"):
            with splice.adapter_routing(model, names):
                pass


def test_an_adapter_of_a_method_that_cannot_route_is_refused(tiny_llama):
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, target_modules=["q_proj"]), "lora")
    splice.attach(tiny_llama, splice.DoRAConfig(rank=4, target_modules=["v_proj"]), "dora")
    with pytest.raises(splice.AdapterError, match="'dora' has a DoRALinear at .*v_proj"):
        with splice.adapter_routing(tiny_llama, ["lora", "dora"]):
            pass


def test_an_active_adapter_that_would_apply_to_every_row_is_refused(tiny_llama):
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, target_modules=["q_proj"]), "lora")
    splice.attach(tiny_llama, splice.IA3Config(), "ia3")
    splice.set_active_adapters(tiny_llama, ["lora", "ia3"])
    with pytest.raises(splice.AdapterError, match="'ia3' is active on .*set_active_adapters"):
        with splice.adapter_routing(tiny_llama, ["lora", BASE]):
            pass
    splice.set_active_adapters(tiny_llama, ["lora"])   # the documented fix
    ids = token_ids(tiny_llama, batch=2)
    with torch.no_grad(), splice.adapter_routing(tiny_llama, ["lora", BASE]):
        tiny_llama(ids)


def test_merged_adapters_are_refused(adapted):
    _, model = adapted
    splice.merge_adapter(model, "a")
    with pytest.raises(splice.AdapterError, match="unmerge_adapter"):
        with splice.adapter_routing(model, ["a", "b"]):
            pass


def test_dropout_in_training_mode_is_refused(tiny_llama):
    splice.attach(tiny_llama, splice.LoRAConfig(rank=4, dropout=0.1, target_modules=["q_proj"]), "a")
    tiny_llama.train()
    ids = token_ids(tiny_llama, batch=2)
    with pytest.raises(splice.AdapterError, match="dropout"):
        with splice.adapter_routing(tiny_llama, ["a", BASE]):
            tiny_llama(ids)
    tiny_llama.eval()  # eval mode: dropout is off, and the rows route
    with torch.no_grad(), splice.adapter_routing(tiny_llama, ["a", BASE]):
        tiny_llama(ids)


# -- any ranks and any assignment of rows ---------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       picks=st.lists(st.integers(-1, 3), min_size=1, max_size=6), tokens=st.integers(1, 3))
def test_any_rows_over_any_ranks_equal_the_closed_form(ranks, picks, tokens):
    """y_i = W₀x_i + b + s_k·B_k·A_k·x_i for row i on adapter k (no term on the base)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7))
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    names = [f"r{i}" for i in range(len(ranks))]
    for name, rank in zip(names, ranks):
        splice.attach(model, splice.LoRAConfig(rank=rank, alpha=rank + 1, target_modules=["0"]), name)
        nn.init.normal_(model[0].lora_B[name].weight)
    rows = [BASE if p < 0 or p >= len(names) else names[p] for p in picks]
    x = torch.randn(len(rows), tokens, 5)
    with torch.no_grad(), splice.adapter_routing(model, rows):
        y = model(x)
    layer = model[0]
    for i, name in enumerate(rows):
        weight = w0
        if name != BASE:
            a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
            weight = w0 + layer.scaling[name] * b @ a
        torch.testing.assert_close(y[i], x[i] @ weight.T + b0, atol=1e-5, rtol=1e-5)


# -- peft's mixed batches give the same logits -------------------------------------------------

def test_peft_adapter_names_path_gives_the_same_logits(tmp_path, tiny_llama):
    from peft import PeftModel

    base = copy.deepcopy(tiny_llama)
    model = tiny_llama
    for seed, (name, config) in enumerate(ADAPTERS["llama"].items()):
        splice.attach(model, config, name)
        randomize_adapter(model, name, seed=seed, scale=0.1)
        splice.save_adapter(model, tmp_path / name, name)
    ids = token_ids(model, batch=len(ROWS))
    with torch.no_grad(), splice.adapter_routing(model, ROWS):
        ours = model(ids).logits
    peft_model = PeftModel.from_pretrained(base, tmp_path / "a", adapter_name="a").eval()
    for name in "bc":
        peft_model.load_adapter(tmp_path / name, adapter_name=name)
    with torch.no_grad():
        theirs = peft_model(ids, adapter_names=ROWS).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


# -- the real model -----------------------------------------------------------------------------

@pytest.mark.integration
def test_mixed_batch_on_smollm2_equals_each_row_alone(smollm2_fresh):
    """In float64: through 30 fp32 layers the routed path's other summation order (s folded into
    B, ranks padded) moves logits of |35| by up to ~2e-3, depending on the adapters' values;
    in float64 the paths agree to rounding, so any larger gap is a routing error."""
    model, _ = smollm2_fresh
    torch.manual_seed(0)
    for seed, rank in enumerate((16, 8, 4)):
        splice.attach(model, splice.LoRAConfig(rank=rank, target_modules="all-linear"), f"r{rank}")
        randomize_adapter(model, f"r{rank}", seed=seed, scale=0.02)
    model.double()
    names = ["r16", BASE, "r4", "r8"]
    ids = token_ids(model, batch=len(names), length=8)
    with torch.no_grad(), splice.adapter_routing(model, names):
        mixed = model(ids).logits
    for i, name in enumerate(names):
        alone = row_alone(model, ids[i:i + 1], name)
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-9, rtol=0,
                                   msg=lambda m: f"row {i} ({name}): {m}")

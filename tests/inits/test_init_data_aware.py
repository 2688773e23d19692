"""EVA and LoRA-GA on a tiny random model: against a dense SVD of the collected inputs, the rank
budget, and the direction of the first update."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import logits, token_ids

import splice
from splice.core.layer import adapter_layers
from splice.inits.data import attach_with_data
from splice.inits.eva import batch_rows
from splice.inits.lora_ga import collect_gradients


def batches_for(model, count: int = 2, batch: int = 3, length: int = 9) -> list[dict]:
    out = []
    for i in range(count):
        ids = token_ids(model, batch=batch, length=length, seed=10 + i)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding the inits must skip
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def dense_inputs(model, paths, batches) -> dict[str, torch.Tensor]:
    """Every input row each module saw at real tokens, by a hook of the test's own."""
    rows = {p: [] for p in paths}
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, args, p=p: rows[p].append(batch_rows(args[0], current[0]).detach()))
        for p in paths]
    current = [None]
    with torch.no_grad():
        for b in batches:
            current[0] = b["attention_mask"]
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return {p: torch.cat(r).double() for p, r in rows.items()}


def test_eva_a_spans_the_top_principal_directions(tiny_llama):
    batches = batches_for(tiny_llama)
    ids = token_ids(tiny_llama)
    before = logits(tiny_llama, ids)
    paths = [p for p, m in tiny_llama.named_modules() if p.endswith(("q_proj", "v_proj", "down_proj"))]
    dense = dense_inputs(tiny_llama, paths, batches)
    config = splice.LoRAConfig(rank=4, init="eva", target_modules=["q_proj", "v_proj", "down_proj"])
    attach_with_data(tiny_llama, config, batches)
    torch.testing.assert_close(logits(tiny_llama, ids), before, atol=0, rtol=0)  # B = 0
    saved = splice.list_adapters(tiny_llama)["default"]
    ranks = {}
    for path in paths:
        layer = tiny_llama.get_submodule(path)
        a = layer.lora_A["default"].weight.double()                       # (k, in)
        ranks[path] = a.shape[0]
        assert saved.rank_for(path) == a.shape[0]
        assert not layer.lora_B["default"].weight.any()
        x = dense[path]
        _, sv, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        top = vh[:a.shape[0]]
        # the same subspace: the projections agree (sign and order within ties do not matter)
        torch.testing.assert_close(a.T @ a, top.T @ top, atol=1e-4, rtol=0)
    assert sum(ranks.values()) == 4 * len(paths)           # the budget is kept
    assert max(ranks.values()) <= 8 and min(ranks.values()) >= 1  # rho = 2 caps at 2r
    assert len(set(ranks.values())) > 1                    # and it was redistributed


def test_eva_rho_one_keeps_every_rank(tiny_llama):
    config = splice.LoRAConfig(rank=4, init="eva", target_modules=["q_proj", "down_proj"],
                               init_options={"eva_rho": 1.0})
    attach_with_data(tiny_llama, config, batches_for(tiny_llama))
    assert all(layer.lora_A["default"].weight.shape[0] == 4 for _, layer in adapter_layers(tiny_llama))


def first_sgd_update(model, batches, lr: float = 1e-3) -> dict[str, torch.Tensor]:
    """ΔW = s·(B'A' - BA) per adapted layer after one SGD step on the mean loss."""
    layers = dict(adapter_layers(model))
    before = {p: l.delta_weight("default").detach().clone() for p, l in layers.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    for b in batches:
        (model(**b).loss / len(batches)).backward()
    optimizer.step()
    return {p: layers[p].delta_weight("default").detach() - before[p] for p in layers}


def test_lora_ga_first_step_follows_the_full_gradient(tiny_llama):
    batches = batches_for(tiny_llama)
    targets = ["q_proj", "v_proj", "up_proj"]
    paths = [p for p, _ in tiny_llama.named_modules() if p.endswith(tuple(targets))]
    full = collect_gradients(tiny_llama, {p: tiny_llama.get_submodule(p) for p in paths}, batches, None)
    ids = token_ids(tiny_llama)
    before = logits(tiny_llama, ids)
    cosines = {}
    for init in ("default", "lora_ga"):
        model = copy.deepcopy(tiny_llama)
        torch.manual_seed(0)
        attach_with_data(model, splice.LoRAConfig(rank=2, init=init, target_modules=targets), batches)
        torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=0)
        step = first_sgd_update(model, batches)
        cosines[init] = sum(torch.nn.functional.cosine_similarity(
            step[p].flatten(), -full[p].flatten(), dim=0).item() for p in paths) / len(paths)
    assert cosines["lora_ga"] > 0.5 > cosines["default"] + 0.2, cosines


def test_lora_ga_leaves_grad_flags_and_grads_as_they_were(tiny_llama):
    flags = {n: p.requires_grad for n, p in tiny_llama.named_parameters()}
    attach_with_data(tiny_llama, splice.LoRAConfig(rank=2, init="lora_ga", target_modules=["q_proj"]),
                     batches_for(tiny_llama))
    for name, param in tiny_llama.named_parameters():
        assert param.grad is None, name
        if "lora_" not in name:
            assert param.requires_grad is False
    assert flags  # (the base was trainable before: attach freezes it, as for any adapter)


def test_lora_ga_without_labels_is_refused_and_changes_nothing(tiny_llama):
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches_for(tiny_llama)]
    weights = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    with pytest.raises(splice.AdapterError, match="labels"):
        attach_with_data(tiny_llama, splice.LoRAConfig(rank=2, init="lora_ga", target_modules=["q_proj"]),
                         batches)
    assert not splice.list_adapters(tiny_llama)
    assert all(torch.equal(p, weights[n]) for n, p in tiny_llama.named_parameters())

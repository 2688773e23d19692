"""Each init's defining property on SmolLM2-135M's weights (a few layers, one short batch)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import splice
from splice.config.lora import InitOptions
from splice.inits.data import attach_with_data
from splice.inits.eva import batch_rows
from splice.inits.loftq import loftq_init, quantize_roundtrip
from splice.inits.lora_ga import collect_gradients

pytestmark = pytest.mark.integration
LAYERS = [0, 1]
TEXT = ["Rewrite as one line: name=...; age=...\nJulia Romero, 73, firefighter from Bologna",
        "The capital of France is Paris, and the capital of Italy is Rome."]


@pytest.fixture(scope="module")
def batch(smollm2):
    _, tokenizer = smollm2
    enc = tokenizer(TEXT, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def config(init: str, targets=("q_proj", "v_proj", "down_proj"), **kw) -> splice.LoRAConfig:
    return splice.LoRAConfig(rank=8, init=init, target_modules=list(targets),
                             layers_to_transform=LAYERS, **kw)


@torch.no_grad()
def logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("init", ["pissa", "olora", "lora_ga"])
def test_step_zero_logits_equal_the_base(init, smollm2_fresh, batch):
    model, _ = smollm2_fresh
    before = logits(model, batch)
    attach_with_data(model, config(init), [batch])
    assert model.model.layers[0].self_attn.q_proj.initial_updates  # the base holds a residual
    torch.testing.assert_close(logits(model, batch), before, atol=2e-4, rtol=0)


def test_loftq_fits_the_quantization_error_better_with_iterations(smollm2):
    model, _ = smollm2
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w = model.get_submodule(path).weight.detach().float()
        plain = (w - quantize_roundtrip(w, 4)).norm().item()
        errors = []
        for iterations in (1, 2, 4):
            init = loftq_init(w, 16, 2.0, InitOptions(loftq_iterations=iterations))
            errors.append((w - (init.base + 2.0 * init.b @ init.a)).norm().item())
        assert errors[0] < plain, (path, plain, errors)
        assert errors[2] <= errors[1] <= errors[0], (path, errors)


def test_eva_spans_the_input_principal_directions_and_keeps_the_budget(smollm2_fresh, batch):
    model, _ = smollm2_fresh
    paths = [f"model.layers.{i}.{m}" for i in LAYERS for m in ("self_attn.q_proj", "mlp.down_proj")]
    rows = {p: [] for p in paths}
    hooks = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, a, p=p: rows[p].append(batch_rows(a[0], batch["attention_mask"]))) for p in paths]
    logits(model, batch)
    for h in hooks:
        h.remove()
    attach_with_data(model, config("eva", targets=("q_proj", "down_proj")), [batch])
    ranks = {}
    for path in paths:
        a = model.get_submodule(path).lora_A["default"].weight.double()      # (k, in)
        x = torch.cat(rows[path]).double()
        vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)[2][:a.shape[0]]
        torch.testing.assert_close(a.T @ a, vh.T @ vh, atol=1e-3, rtol=0)
        ranks[path] = a.shape[0]
    assert sum(ranks.values()) == 8 * len(paths) and max(ranks.values()) <= 16
    assert len(set(ranks.values())) > 1, ranks


def test_lora_ga_first_update_is_closer_to_the_full_step(smollm2_fresh, batch):
    model, _ = smollm2_fresh
    targets = ("q_proj", "v_proj")
    paths = [f"model.layers.{i}.self_attn.{m}" for i in LAYERS for m in targets]
    full = collect_gradients(model, {p: model.get_submodule(p) for p in paths}, [batch], None)
    cosine = {}
    for init in ("default", "lora_ga"):
        adapted = copy.deepcopy(model)
        torch.manual_seed(0)
        attach_with_data(adapted, config(init, targets=targets), [batch])
        layers = {p: adapted.get_submodule(p) for p in paths}
        start = {p: l.delta_weight("default").detach().clone() for p, l in layers.items()}
        params = [q for q in adapted.parameters() if q.requires_grad]
        adapted(**batch).loss.backward()
        torch.optim.SGD(params, lr=1e-3).step()
        cosine[init] = sum(torch.nn.functional.cosine_similarity(
            (layers[p].delta_weight("default") - start[p]).flatten(), -full[p].flatten(), dim=0).item()
            for p in paths) / len(paths)
        del adapted
    assert cosine["lora_ga"] > cosine["default"] + 0.2, cosine


def test_converted_pissa_adapter_loads_on_the_untouched_base(smollm2, batch, tmp_path):
    peft = pytest.importorskip("peft")
    base, _ = smollm2
    model = copy.deepcopy(base)
    splice.attach(model, config("pissa"))
    with torch.no_grad():  # stand-in for training: move B and A off their start
        generator = torch.Generator().manual_seed(0)
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01 * param.abs().mean())
    expected = logits(model, batch)
    splice.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 16
    del model
    fresh = copy.deepcopy(base)
    splice.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, batch), expected, atol=2e-4, rtol=0)
    del fresh
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(logits(in_peft, batch), expected, atol=2e-4, rtol=0)

"""Adapter diagnostics on the real SmolLM2-135M: a LoRA on three q_proj/v_proj matrices, with an
intruder planted in one; a small full-rank update of a real weight shows none."""

from __future__ import annotations

import pytest
import torch

import splice
from splice.analysis import BaseSVDCache, analyze_adapter, intruder_dimensions

pytestmark = pytest.mark.integration

PLANTED = "model.layers.0.self_attn.q_proj"


def test_planted_intruder_in_smollm2(smollm2_fresh):
    model, _ = smollm2_fresh
    # q_proj of block 0 (576×576, where the intruder goes) and v_proj of blocks 0 and 1
    # (192×576): a few matrices keep the full SVDs quick.
    targets = r"model\.layers\.0\.self_attn\.q_proj|model\.layers\.[01]\.self_attn\.v_proj"
    splice.attach(model, splice.LoRAConfig(rank=8, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    layer = model.get_submodule(PLANTED)
    w0 = layer.base_layer.weight.detach()                           # (576, 576)
    cache = BaseSVDCache()                    # the analysis below reuses this SVD of W₀
    u0 = cache.left_vectors(w0).double()                            # (576, 576)
    s0 = (u0.T @ w0.double()).norm(dim=1)     # σᵢ = ‖U₀[:, i]ᵀ W₀‖
    u = u0.sum(1) / u0.sum(1).norm()          # |cos| = 1/24 with every singular vector of W₀
    v = torch.randn(w0.shape[1], generator=generator, dtype=torch.float64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:              # early training: B small, as after a few steps
                param.normal_(0.0, 1e-4, generator=generator)
        # ΔW = s·B·A with one column/row carrying σ·u·vᵀ, σ between W₀'s σ₁ and σ₂
        sigma = float(s0[0] + s0[1]) / 2
        scaling = layer.scaling["default"]
        layer.lora_B["default"].weight[:, 0] = (sigma / scaling * u).float()
        layer.lora_A["default"].weight[0] = (v / v.norm()).float()
    analysis = analyze_adapter(model, cache=cache)
    assert [m.path for m in analysis.matrices] == [
        PLANTED, "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert cache.misses == 3
    assert analysis.summary.intruder_dimensions == 1
    for row in analysis.matrices:
        assert row.intruders.intruder_indices(0.5) == ([1] if row.path == PLANTED else [])
    planted = next(m for m in analysis.matrices if m.path == PLANTED)
    assert planted.spectrum.values[0] == pytest.approx(sigma, rel=1e-3)
    assert planted.rank_budget == 8

    # A full fine-tune-like dense update of 1% of ‖W₀‖_F moves no top direction away.
    v_proj = model.get_submodule("model.layers.1.self_attn.v_proj").base_layer.weight.detach()
    delta = torch.randn(v_proj.shape, generator=generator)
    delta = delta / delta.norm() * 0.01 * v_proj.norm()
    found = intruder_dimensions(v_proj, v_proj + delta, base_vectors=cache.left_vectors(v_proj))
    assert found.counts[0.5] == 0 and cache.misses == 3

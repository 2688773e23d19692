"""analyze_adapter / compare_adapters on tiny models: every number against a dense recomputation
from the merged model (ΔW = W_merged − W₀), for LoRA (linear, Conv1D, embedding), DoRA and IA³;
a planted intruder found in exactly its module; a saved adapter analysed from its folder; the
cosine of two adapters in the closed cases; refusals."""

from __future__ import annotations

import copy
import json

import matplotlib.image
import pytest
import torch
from torch import nn

import splice
from splice.analysis import (AnalysisConfig, BaseSVDCache, analyze_adapter, analyze_folder,
                             compare_adapters, compare_folders, intruder_dimensions)
from splice.analysis.plots import plot_analysis
from splice.core.layer import adapter_layers
from splice.core.targets import Conv1D
from helpers import randomize_adapter

CONFIGS = {
    "lora": ("llama", lambda: splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj",
                                                                         "down_proj"])),
    "lora-embedding": ("llama", lambda: splice.LoRAConfig(rank=4, target_modules=["embed_tokens",
                                                                                   "o_proj"])),
    "lora-conv1d": ("gpt2", lambda: splice.LoRAConfig(rank=4, target_modules=["c_attn", "c_proj"])),
    "dora": ("llama", lambda: splice.DoRAConfig(rank=4, target_modules=["q_proj", "v_proj"])),
    "ia3": ("llama", lambda: splice.IA3Config()),
    "ia3-conv1d": ("gpt2", lambda: splice.IA3Config()),
}


def as_map(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The test's own orientation rule: (out, in) for a linear map."""
    transposed = isinstance(module, nn.Embedding) or bool(Conv1D and isinstance(module, Conv1D))
    return (weight.T if transposed else weight).double()


@pytest.mark.parametrize("case", list(CONFIGS))
def test_every_matrix_against_the_merged_model(case, tiny_llama, tiny_gpt2):
    kind, make_config = CONFIGS[case]
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    model = splice.attach(copy.deepcopy(base), make_config())
    randomize_adapter(model, scale=0.2)
    config = AnalysisConfig(top_k=5)
    analysis = analyze_adapter(model, top_k=5)
    assert analysis.config == config
    merged = splice.merge_and_unload(copy.deepcopy(model))
    paths = [p for p, _ in adapter_layers(model)]
    assert [m.path for m in analysis.matrices] == paths and paths
    for row in analysis.matrices:
        module = base.get_submodule(row.path)
        w0 = as_map(module, module.weight.detach())
        delta = as_map(module, merged.get_submodule(row.path).weight.detach()) - w0
        assert row.shape == tuple(w0.shape)
        assert row.delta_norm == pytest.approx(float(delta.norm()), rel=1e-4)
        assert row.base_norm == pytest.approx(float(w0.norm()), rel=1e-5)
        dense = torch.linalg.svdvals(delta)
        values = torch.tensor(row.spectrum.values, dtype=torch.float64)
        torch.testing.assert_close(values, dense[:len(values)], rtol=1e-3, atol=1e-5)
        assert float(dense[len(values):].norm()) < 1e-4 * float(dense.norm())  # nothing left out
        reference = intruder_dimensions(w0, w0 + delta, top_k=5)
        torch.testing.assert_close(torch.tensor(row.intruders.max_cosines),
                                   torch.tensor(reference.max_cosines), atol=2e-3, rtol=0)
        assert row.intruders.counts == {e: row.intruders.count(e) for e in config.epsilons}
        low_rank = case.startswith(("lora", "dora"))
        assert row.rank_budget == (4 if low_rank else None)
        if case.startswith("lora"):
            assert len(values) == 4           # from the factors: r values
    summary = analysis.summary
    assert summary.matrices == len(paths)
    assert summary.intruder_dimensions == sum(m.intruders.count(0.5) for m in analysis.matrices)
    assert summary.intruder_counts == {e: sum(m.intruders.counts[e] for m in analysis.matrices)
                                       for e in config.epsilons}
    total = sum(m.delta_norm ** 2 for m in analysis.matrices) ** 0.5
    assert summary.relative_norm == pytest.approx(
        total / sum(m.base_norm ** 2 for m in analysis.matrices) ** 0.5)
    json.dumps(analysis.to_dict())            # JSON-ready


def planted_lora(base: nn.Module, path: str, seed: int = 0) -> nn.Module:
    """Rank-1 LoRA on q_proj/v_proj, near zero everywhere except `path`, where ΔW = σ·u·vᵀ with
    u at |cos| = 1/√n from every singular vector of W₀ and σ = 3·σ₁(W₀)."""
    config = splice.LoRAConfig(rank=1, alpha=1, target_modules=["q_proj", "v_proj"])
    model = splice.attach(copy.deepcopy(base), config)
    randomize_adapter(model, seed=seed, scale=1e-3)
    layer = model.get_submodule(path)
    w0 = layer.base_layer.weight.detach().double()
    u0, s0, _ = torch.linalg.svd(w0, full_matrices=False)
    u = u0.sum(1) / u0.sum(1).norm()
    v = torch.randn(w0.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_((3 * s0[0] * u)[:, None])
        layer.lora_A["default"].weight.copy_((v / v.norm())[None, :])
    return model


def test_a_planted_intruder_is_found_in_its_module_only(tiny_llama):
    path = "model.layers.1.self_attn.q_proj"
    analysis = analyze_adapter(planted_lora(tiny_llama, path))
    assert analysis.summary.intruder_dimensions == 1
    assert analysis.summary.matrices_with_intruders == 1
    for row in analysis.matrices:
        assert row.intruders.intruder_indices(0.5) == ([0] if row.path == path else [])
    # near-zero updates elsewhere leave W₀'s top directions in place
    assert min(min(r.intruders.max_cosines) for r in analysis.matrices if r.path != path) > 0.9


def test_a_saved_adapter_analysed_from_its_folder(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "base")
    model = splice.attach(copy.deepcopy(tiny_llama), CONFIGS["lora"][1]())
    randomize_adapter(model, scale=0.2)
    splice.save_adapter(model, tmp_path / "adapter")
    from_folder = analyze_folder(tmp_path / "base", tmp_path / "adapter")
    in_memory = analyze_adapter(model)
    assert [m.path for m in from_folder.matrices] == [m.path for m in in_memory.matrices]
    for a, b in zip(from_folder.matrices, in_memory.matrices):
        assert a.delta_norm == pytest.approx(b.delta_norm, rel=1e-6)
        assert a.spectrum.values == pytest.approx(b.spectrum.values, rel=1e-5)
        assert a.intruders.max_cosines == pytest.approx(b.intruders.max_cosines, abs=1e-5)
    assert from_folder.summary.intruder_dimensions == in_memory.summary.intruder_dimensions
    spectra, intruders = plot_analysis(from_folder, tmp_path / "plots" / "run")
    for png in (spectra, intruders):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(png).shape[0] > 100


def test_one_cache_computes_each_base_svd_once(tiny_llama):
    model = splice.attach(copy.deepcopy(tiny_llama), CONFIGS["lora"][1]())
    splice.attach(model, CONFIGS["lora"][1](), "other")
    cache = BaseSVDCache()
    analyze_adapter(model, "default", cache=cache)
    assert cache.misses == 6
    analyze_adapter(model, "other", cache=cache)
    assert cache.misses == 6


def flattened_cosine(model: nn.Module, a: str, b: str) -> float:
    """The dense reference: every ΔW of both adapters flattened into one vector each."""
    xs, ys = [], []
    for _, layer in adapter_layers(model):
        for name, out in ((a, xs), (b, ys)):
            out.append(layer.delta_weight(name).detach().double().flatten()
                       if layer.has_adapter(name) else torch.zeros(layer.base_weight().numel(),
                                                                  dtype=torch.float64))
    x, y = torch.cat(xs), torch.cat(ys)
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("make_config", [CONFIGS["lora"][1], CONFIGS["dora"][1]],
                         ids=["lora", "dora"])
def test_compare_identical_negated_and_independent(make_config, tiny_llama):
    model = splice.attach(copy.deepcopy(tiny_llama), make_config(), "a")
    randomize_adapter(model, "a", seed=1, scale=0.2)
    for name in ("same", "negated", "other"):
        splice.attach(model, make_config(), name)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            source = layer.file_tensors("a")
            for name in ("same", "negated"):
                for key, param in layer.file_tensors(name).items():
                    negate = name == "negated" and key.startswith("lora_B")
                    param.copy_(-source[key] if negate else source[key])
    randomize_adapter(model, "other", seed=2, scale=0.2)
    same = compare_adapters(model, "a", "same")
    assert same.cosine == pytest.approx(1.0, abs=1e-6)
    assert all(r.cosine == pytest.approx(1.0, abs=1e-6) for r in same.matrices)
    if make_config is CONFIGS["lora"][1]:      # DoRA's update is not odd in B·A
        assert compare_adapters(model, "a", "negated").cosine == pytest.approx(-1.0, abs=1e-6)
    other = compare_adapters(model, "a", "other")
    assert other.cosine == pytest.approx(flattened_cosine(model, "a", "other"), abs=1e-6)
    for row in other.matrices:
        layer = model.get_submodule(row.path)
        x, y = (layer.delta_weight(n).detach().double().flatten() for n in ("a", "other"))
        assert row.cosine == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-6)
        assert row.norm_a == pytest.approx(float(x.norm()), rel=1e-4)


def test_compare_adapters_on_different_modules(tiny_llama):
    model = splice.attach(copy.deepcopy(tiny_llama),
                          splice.LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]), "a")
    splice.attach(model, splice.LoRAConfig(rank=2, target_modules=["v_proj", "o_proj"]), "b")
    randomize_adapter(model, "a", seed=3, scale=0.2)
    randomize_adapter(model, "b", seed=4, scale=0.2)
    result = compare_adapters(model, "a", "b")
    kinds = {r.path.rsplit(".", 1)[-1]: r for r in result.matrices}
    assert set(kinds) == {"q_proj", "v_proj", "o_proj"}
    assert all(r.cosine is None for r in result.matrices if not r.path.endswith("v_proj"))
    assert all(r.norm_b == 0.0 for r in result.matrices if r.path.endswith("q_proj"))
    assert result.cosine == pytest.approx(flattened_cosine(model, "a", "b"), abs=1e-6)


def test_refuses_what_has_no_weight_update(tiny_llama):
    model = splice.attach(copy.deepcopy(tiny_llama),
                          splice.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(splice.AdapterError, match="changes no weight"):
        analyze_adapter(model)
    merged = splice.attach(copy.deepcopy(tiny_llama), CONFIGS["lora"][1]())
    splice.merge_adapter(merged)
    with pytest.raises(splice.AdapterError, match="unmerge"):
        analyze_adapter(merged)


def test_compare_folders_of_methods_that_cannot_share_a_module(tmp_path, tiny_llama):
    """A LoRA and a DoRA adapter on the same modules cannot sit on one model together; the
    folders are compared in turns, against the dense cosine of the two models' updates."""
    tiny_llama.save_pretrained(tmp_path / "base")
    models = {}
    for seed, (kind, make_config) in enumerate((CONFIGS["lora"], CONFIGS["dora"])):
        models[seed] = splice.attach(copy.deepcopy(tiny_llama), make_config())
        randomize_adapter(models[seed], seed=seed, scale=0.2)
        splice.save_adapter(models[seed], tmp_path / str(seed))
    result = compare_folders(tmp_path / "base", tmp_path / "0", tmp_path / "1")
    assert [r.path for r in result.matrices] == [p for p, _ in adapter_layers(models[0])]
    adapted = [dict(adapter_layers(models[i])) for i in (0, 1)]
    xs, ys = [], []
    for row in result.matrices:
        x, y = (adapted[i][row.path].delta_weight("default").detach().double().flatten()
                if row.path in adapted[i] else None for i in (0, 1))
        y = torch.zeros_like(x) if y is None else y        # DoRA adapts a subset of LoRA's
        xs.append(x)
        ys.append(y)
        if row.cosine is not None:
            assert row.cosine == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-6)
    x, y = torch.cat(xs), torch.cat(ys)
    assert result.cosine == pytest.approx(float(x @ y / (x.norm() * y.norm())), abs=1e-6)
    assert sum(r.cosine is not None for r in result.matrices) == 4   # q_proj, v_proj × 2 blocks

"""Adapter composition against closed forms, dense recomputation and peft's add_weighted_adapter.

Where the definitions agree, peft is the oracle: `cat` = peft's `cat`; `svd` = peft's `svd`;
`ties`, `magnitude_prune`, `dare_linear`, `dare_ties` = peft's `*_svd` variants (elementwise on
the dense ΔWᵢ, then a truncated SVD). peft's `linear`, `ties`, `dare_*` and `magnitude_prune`
without `_svd` act on the A's and the B's separately, with √|wᵢsᵢ| on each side: the
tests below pin down exactly what those compute and show where they differ from ours.

DARE is random: peft draws its masks from the global generator right after it initialises the
new adapter; the tests re-seed that generator at that point (hooking peft's `_freeze_adapter`,
which runs between the two), so peft's masks come from the same seed and in the same order as
ours, and the results are compared entry for entry. A separate test checks the statistics
(kept fraction, expectation) that hold whatever the generator.
"""

from __future__ import annotations

import copy
import math

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from peft.tuners.lora import LoraLayer

import splice
from helpers import logits, randomize_adapter, token_ids
from splice.config.base import ConfigError
from splice.core.layer import adapter_layers
from splice.merge import compose as C
from splice.merge.compose_config import CompositionConfig

SEED = 7
TARGETS = ["q_proj", "v_proj", "down_proj"]
# fp32 SVDs of the same matrix by different routes (QR core vs dense; reduced vs full) agree to
# a few ulps of the largest singular value; the deltas here are O(0.1-1).
SVD_ATOL = 2e-5


# -- helpers ----------------------------------------------------------------------------------

def add_adapters(model, configs: dict[str, splice.LoRAConfig], scale: float = 0.3) -> None:
    """Attach each adapter with seeded random A and B (so every ΔW is non-zero)."""
    for i, (name, config) in enumerate(configs.items()):
        splice.attach(model, config, name)
        randomize_adapter(model, name, seed=i + 1, scale=scale)


def splice_deltas(model, name: str) -> dict[str, torch.Tensor]:
    return {path: layer.delta_weight(name).detach() for path, layer in adapter_layers(model)
            if layer.has_adapter(name)}


def weighted_sum(model, names, weights) -> dict[str, torch.Tensor]:
    """Σ wᵢΔWᵢ per module, recomputed densely from each adapter's own delta_weight."""
    out: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights):
        for path, delta in splice_deltas(model, name).items():
            out[path] = out.get(path, 0) + w * delta
    return out


def peft_twin(base, model, names, tmp_path) -> PeftModel:
    """A peft model on a copy of `base` holding splice's adapters `names`, loaded from files."""
    folders = {n: splice.save_adapter(model, tmp_path / f"src-{n}", n) for n in names}
    twin = PeftModel.from_pretrained(copy.deepcopy(base), folders[names[0]], adapter_name=names[0])
    for n in names[1:]:
        twin.load_adapter(folders[n], adapter_name=n)
    return twin.eval()


def peft_deltas(twin: PeftModel, name: str) -> dict[str, torch.Tensor]:
    return {path: layer.get_delta_weight(name).detach()
            for path, layer in twin.base_model.model.named_modules()
            if isinstance(layer, LoraLayer) and name in layer.lora_A}


def reseed_after_peft_init(monkeypatch) -> None:
    """Seed the global generator between peft's new-adapter init and its DARE draws."""
    original = peft_lora_model._freeze_adapter

    def freeze_then_seed(*args, **kwargs):
        original(*args, **kwargs)
        torch.manual_seed(SEED)

    monkeypatch.setattr(peft_lora_model, "_freeze_adapter", freeze_then_seed)


def assert_deltas_close(actual: dict, expected: dict, atol: float) -> None:
    assert actual.keys() == expected.keys()
    for path in expected:
        torch.testing.assert_close(actual[path], expected[path], atol=atol, rtol=0,
                                   msg=lambda m: f"{path}: {m}")


def random_updates(ranks=(2, 3), shape=(12, 9), seed=0) -> list[C.LoRAUpdate]:
    g = torch.Generator().manual_seed(seed)
    out, d_in = shape
    return [C.LoRAUpdate(torch.randn(r, d_in, generator=g), torch.randn(out, r, generator=g),
                         scaling=0.5 + i) for i, r in enumerate(ranks)]


# -- the pure functions -----------------------------------------------------------------------

def test_cat_and_linear_are_the_exact_weighted_sum_at_rank_sum_of_ranks():
    updates, weights = random_updates(), [0.7, -1.3]
    dense = sum(w * u.delta().double() for u, w in zip(updates, weights))
    for composed in (C.cat(updates, weights), C.linear(updates, weights)):
        assert composed.rank == 5 and composed.error == 0.0
        torch.testing.assert_close((composed.b @ composed.a).double(), dense, atol=1e-5, rtol=0)
        assert composed.norm == pytest.approx(float(dense.norm()), rel=1e-6)


@settings(max_examples=60, deadline=None)
@given(ranks=st.lists(st.integers(1, 5), min_size=1, max_size=4), out=st.integers(1, 10),
       d_in=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_linear_is_the_weighted_sum_for_any_shapes_and_ranks(ranks, out, d_in, seed):
    g = torch.Generator().manual_seed(seed)
    updates = [C.LoRAUpdate(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                            torch.randn(out, r, generator=g, dtype=torch.float64), 0.5 + r)
               for r in ranks]
    weights = (torch.randn(len(ranks), generator=g) * 2).tolist()
    dense = sum(w * u.delta().double() for u, w in zip(updates, weights))
    exact = C.linear(updates, weights)
    assert exact.rank == sum(ranks)
    torch.testing.assert_close((exact.b @ exact.a).double(), dense, atol=1e-4, rtol=1e-5)
    # At a rank no smaller than the sum's own, the truncated form loses nothing either.
    full = C.linear(updates, weights, rank=min(sum(ranks), out, d_in))
    assert full.error < 1e-5
    torch.testing.assert_close((full.b @ full.a).double(), dense, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_svd_error_is_the_closed_form_tail_of_singular_values(rank):
    updates, weights = random_updates(ranks=(2, 4)), [1.0, -0.5]
    dense = sum(w * u.delta().double() for u, w in zip(updates, weights))
    sigma = torch.linalg.svdvals(dense)
    expected_error = math.sqrt(float(sigma[rank:].pow(2).sum() / sigma.pow(2).sum()))
    for composed in (C.svd(updates, weights, rank), C.linear(updates, weights, rank)):
        assert composed.rank == rank   # padded with zero components past the sum's rank (6)
        assert composed.error == pytest.approx(expected_error, abs=1e-6)
        # The reported error is the actual relative Frobenius error of the stored factors.
        actual = float((dense - (composed.b @ composed.a).double()).norm() / dense.norm())
        assert actual == pytest.approx(expected_error, abs=1e-5)
        # Eckart-Young: the truncation is the best rank-k approximation, σ₁..σₖ kept.
        kept = torch.linalg.svdvals((composed.b @ composed.a).double())[:rank]
        torch.testing.assert_close(kept, sigma[:rank].clamp_min(0), atol=1e-4, rtol=0)


def test_truncating_dense_and_factored_agree():
    updates, weights = random_updates(ranks=(3, 3)), [1.0, 2.0]
    exact = C.cat(updates, weights)
    factored = C.truncate_product(exact.b, exact.a, 2)
    dense = C.truncate(exact.b @ exact.a, 2)
    torch.testing.assert_close(factored.b @ factored.a, dense.b @ dense.a, atol=1e-5, rtol=0)
    assert factored.error == pytest.approx(dense.error, abs=1e-6)


def test_trim_keeps_the_largest_magnitudes():
    t = torch.tensor([[0.1, -3.0, 2.0], [-0.5, 0.2, 1.0]])
    torch.testing.assert_close(C.trim(t, 0.5), torch.tensor([[0.0, -3.0, 2.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(C.trim(t, 1.0), t)


def test_ties_closed_form_on_a_small_example():
    # trim at density 2/3 keeps 2 of 3 per update; signs elected from the unweighted sum.
    t1 = torch.tensor([3.0, -1.0, 0.5])
    t2 = torch.tensor([-1.0, -2.0, 4.0])
    trimmed = [torch.tensor([3.0, -1.0, 0.0]), torch.tensor([0.0, -2.0, 4.0])]
    # elected: sign(3) = +, sign(-3) = -, sign(4) = +; entry 0: only t1 agrees, entry 1: both,
    # entry 2: only t2 agrees. Weighted (2, -1), then mean over the agreeing ones.
    expected = torch.tensor([2 * 3.0, (2 * -1.0 + -1 * -2.0) / 2, -1 * 4.0])
    torch.testing.assert_close(C.ties([t1, t2], [2.0, -1.0], 2 / 3), expected)
    assert C.trim(t1, 2 / 3).count_nonzero() == 2 and torch.equal(C.trim(t2, 2 / 3), trimmed[1])


def test_dare_drop_keeps_density_and_is_unbiased():
    """The statistics of the random drop: the kept fraction is the density, E[drop(t)] = t."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(200, 300, generator=g)
    density = 0.3
    dropped = C.drop(t, density, g)
    kept = dropped != 0
    n = t.numel()
    assert abs(float(kept.float().mean()) - density) < 4 * math.sqrt(density * (1 - density) / n)
    torch.testing.assert_close(dropped[kept], t[kept] / density)
    small = torch.randn(6, 5, generator=g)
    mean = torch.stack([C.drop(small, density, g) for _ in range(20000)]).mean(0)
    # Each entry's mean of 20000 draws: std = |t|·√((1−p)/p)/√20000 ≈ 0.011·|t|.
    torch.testing.assert_close(mean, small, atol=float(6 * 0.011 * small.abs().max()), rtol=0)
    # The same seed gives the same mask; density 1 keeps everything and draws nothing.
    a = C.drop(t, density, torch.Generator().manual_seed(3))
    assert torch.equal(a, C.drop(t, density, torch.Generator().manual_seed(3)))
    g1 = torch.Generator().manual_seed(5)
    assert torch.equal(C.drop(t, 1.0, g1), t)
    assert torch.equal(g1.get_state(), torch.Generator().manual_seed(5).get_state())


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights=(1.0,), method="ties"), "needs a density"),
    (dict(weights=(1.0,), method="linear", density=0.5), "keeps every entry"),
    (dict(weights=(1.0,), method="cat", rank=4), "exact at rank"),
    (dict(weights=(1.0,), method="ties", density=0.0), "fraction in"),
    (dict(weights=(), method="linear"), "one weight per adapter"),
    (dict(weights=(1.0, float("nan"))), "finite"),
    (dict(weights=(1.0,), method="mean"), "choose one of"),
])
def test_composition_config_names_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        CompositionConfig(**kwargs)


# -- on a model: exactness --------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_linear_composition_logits_equal_the_dense_sum_merged(kind, tiny_llama, tiny_gpt2):
    base = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    targets = TARGETS if kind == "llama" else ["c_attn", "c_proj"]
    model = copy.deepcopy(base)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=targets),
                         "b": splice.LoRAConfig(rank=2, alpha=3, target_modules=targets)})
    weights = [1.0, -0.5]
    expected_deltas = weighted_sum(model, ["a", "b"], weights)
    report = splice.compose_adapters(model, ["a", "b"], weights, "linear", new_name="ab")
    assert {m.rank for m in report.modules} == {6} and report.max_error == 0.0
    assert_deltas_close(splice_deltas(model, "ab"), expected_deltas, atol=1e-6)

    # Reference: the base with Σ wᵢΔWᵢ added to its dense weights, no adapter at all.
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for path, delta in expected_deltas.items():
            dense.get_submodule(path).weight.add_(delta)
    ids = token_ids(base)
    splice.set_active_adapters(model, "ab")
    assert not torch.allclose(logits(dense, ids), logits(base, ids), atol=1e-3)
    torch.testing.assert_close(logits(model, ids), logits(dense, ids), atol=1e-5, rtol=0)


def test_negative_weight_subtracts_an_adapter_to_zero(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=TARGETS)})
    splice.compose_adapters(model, ["a", "a"], [1.0, -1.0], "linear", new_name="zero")
    for path, delta in splice_deltas(model, "zero").items():
        assert float(delta.abs().max()) < 1e-6, path
    splice.set_active_adapters(model, "zero")
    ids = token_ids(model)
    torch.testing.assert_close(logits(model, ids), logits(tiny_llama, ids), atol=1e-5, rtol=0)


def test_adapters_on_different_modules_compose_as_zero_where_absent(tiny_llama, tmp_path):
    """a adapts q/v, b adapts v/down and the embedding: the union, each at its own rank."""
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {
        "a": splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]),
        "b": splice.LoRAConfig(rank=2, target_modules=["v_proj", "down_proj", "embed_tokens"])})
    weights = [2.0, -1.0]
    expected = weighted_sum(model, ["a", "b"], weights)
    report = splice.compose_adapters(model, ["a", "b"], weights, "cat", new_name="ab")
    ranks = {m.path.rsplit(".", 1)[-1]: m.rank for m in report.modules}
    assert ranks == {"q_proj": 4, "v_proj": 6, "down_proj": 2, "embed_tokens": 2}
    assert_deltas_close(splice_deltas(model, "ab"), expected, atol=1e-6)

    # Per-module ranks go to rank_pattern / alpha_pattern; peft reads them the same way.
    folder = splice.save_adapter(model, tmp_path / "ab", "ab")
    twin = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), folder).eval()
    splice.set_active_adapters(model, "ab")
    ids = token_ids(model)
    torch.testing.assert_close(logits(twin, ids), logits(model, ids), atol=1e-5, rtol=0)


def test_truncating_methods_default_to_the_largest_input_rank_everywhere(tiny_llama):
    """q/v_proj carry only the rank-2 adapter, yet the svd result has rank 4 there too (zero
    components pad it), so the file needs no per-module rank; every sum fits: no error."""
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=2, target_modules=["q_proj", "v_proj"]),
                         "b": splice.LoRAConfig(rank=4, target_modules=["down_proj"])})
    weights = [1.0, 1.0]
    report = splice.compose_adapters(model, ["a", "b"], weights, "svd", new_name="s")
    assert {m.rank for m in report.modules} == {4}
    assert report.max_error == pytest.approx(0, abs=1e-6)
    assert splice.list_adapters(model)["s"].rank_pattern == {}
    assert_deltas_close(splice_deltas(model, "s"), weighted_sum(model, ["a", "b"], weights),
                        atol=1e-5)


# -- against peft's add_weighted_adapter -------------------------------------------------------

def test_cat_equals_peft_cat_with_different_ranks(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=2, target_modules=TARGETS),
                         "b": splice.LoRAConfig(rank=4, alpha=5, target_modules=TARGETS)})
    weights = [0.7, -1.3]
    twin = peft_twin(tiny_llama, model, ["a", "b"], tmp_path)
    twin.add_weighted_adapter(["a", "b"], weights, "c", combination_type="cat")
    splice.compose_adapters(model, ["a", "b"], weights, "cat", new_name="c")
    assert_deltas_close(splice_deltas(model, "c"), peft_deltas(twin, "c"), atol=1e-6)


def test_svd_equals_peft_svd(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=TARGETS),
                         "b": splice.LoRAConfig(rank=3, target_modules=TARGETS)})
    weights = [1.0, 0.5]
    twin = peft_twin(tiny_llama, model, ["a", "b"], tmp_path)
    twin.add_weighted_adapter(["a", "b"], weights, "c", combination_type="svd", svd_rank=3)
    report = splice.compose_adapters(model, ["a", "b"], weights, "svd", rank=3, new_name="c")
    assert_deltas_close(splice_deltas(model, "c"), peft_deltas(twin, "c"), atol=SVD_ATOL)
    assert 0 < report.max_error < 1


ELEMENTWISE = [  # (ours, peft's same definition, majority sign)
    ("ties", "ties_svd", "total"),
    ("ties", "ties_svd", "frequency"),
    ("magnitude_prune", "magnitude_prune_svd", "total"),
    ("dare_linear", "dare_linear_svd", "total"),
    ("dare_ties", "dare_ties_svd", "total"),
]


@pytest.mark.parametrize("ours, theirs, majority", ELEMENTWISE,
                         ids=[f"{o}-{m}" for o, _, m in ELEMENTWISE])
def test_elementwise_methods_equal_peft_svd_variants(ours, theirs, majority, tiny_llama, tmp_path,
                                                     monkeypatch):
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=TARGETS),
                         "b": splice.LoRAConfig(rank=4, alpha=2, target_modules=TARGETS)})
    weights, density, rank = [1.0, -0.6], 0.4, 6
    twin = peft_twin(tiny_llama, model, ["a", "b"], tmp_path)
    reseed_after_peft_init(monkeypatch)
    twin.add_weighted_adapter(["a", "b"], weights, "c", combination_type=theirs, svd_rank=rank,
                              density=density, majority_sign_method=majority)
    report = splice.compose_adapters(model, ["a", "b"], weights, ours, density=density, rank=rank,
                                     majority_sign=majority, seed=SEED, new_name="c")
    expected = peft_deltas(twin, "c")
    assert_deltas_close(splice_deltas(model, "c"), expected, atol=SVD_ATOL)
    # Pruning made the update full-rank: truncating to 6 loses something, and the report says so.
    assert all(m.rank == rank and 0 < m.error < 1 for m in report.modules)


def test_dare_seed_changes_the_result(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=TARGETS)})
    for name, seed in (("s0", 0), ("s0b", 0), ("s1", 1)):
        splice.compose_adapters(model, ["a"], [1.0], "dare_linear", density=0.5, seed=seed,
                                new_name=name)
    d0, d0b, d1 = (splice_deltas(model, n) for n in ("s0", "s0b", "s1"))
    assert all(torch.equal(d0[p], d0b[p]) for p in d0)
    assert not any(torch.allclose(d0[p], d1[p]) for p in d0)


def test_peft_linear_is_not_the_weighted_sum_it_has_cross_terms(tiny_llama, tmp_path):
    """peft's "linear": A' = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ, B' = Σ √|wᵢsᵢ|·Bᵢ, scaling 1, so
    B'A' = Σᵢ wᵢΔWᵢ + Σ_{i≠j} (cross terms BᵢAⱼ). Ours is the weighted sum itself."""
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=TARGETS),
                         "b": splice.LoRAConfig(rank=4, alpha=2, target_modules=TARGETS)})
    weights = [1.0, -0.5]
    twin = peft_twin(tiny_llama, model, ["a", "b"], tmp_path)
    twin.add_weighted_adapter(["a", "b"], weights, "c", combination_type="linear")
    splice.compose_adapters(model, ["a", "b"], weights, "linear", new_name="c")
    exact = weighted_sum(model, ["a", "b"], weights)
    theirs = peft_deltas(twin, "c")
    for path, layer in adapter_layers(model):
        if not layer.has_adapter("c"):
            continue
        a_side, b_side = [], []
        for name, w in zip(["a", "b"], weights):
            ws = w * layer.scaling[name]
            a_side.append(math.copysign(math.sqrt(abs(ws)), ws) * layer.lora_A[name].weight)
            b_side.append(math.sqrt(abs(ws)) * layer.lora_B[name].weight)
        closed_form = (sum(b_side) @ sum(a_side)).detach()
        torch.testing.assert_close(theirs[path], closed_form, atol=1e-6, rtol=0)
        assert not torch.allclose(theirs[path], exact[path], atol=1e-3)
    assert_deltas_close(splice_deltas(model, "c"), exact, atol=1e-6)


def test_peft_ties_without_svd_works_on_the_factors_separately(tiny_llama, tmp_path):
    """peft's "ties" (no _svd) runs TIES on the A's and on the B's (with √|wᵢsᵢ| per side, the
    sign on A) and multiplies the results: not TIES of the updates, which ours is."""
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=TARGETS),
                         "b": splice.LoRAConfig(rank=4, target_modules=TARGETS)})
    weights, density = [1.0, 0.8], 0.5
    twin = peft_twin(tiny_llama, model, ["a", "b"], tmp_path)
    twin.add_weighted_adapter(["a", "b"], weights, "c", combination_type="ties", density=density)
    splice.compose_adapters(model, ["a", "b"], weights, "ties", density=density, rank=8,
                            new_name="c")
    theirs, ours = peft_deltas(twin, "c"), splice_deltas(model, "c")
    for path, layer in adapter_layers(model):
        if not layer.has_adapter("c"):
            continue
        ws = [w * layer.scaling[n] for n, w in zip(["a", "b"], weights)]
        a = C.ties([layer.lora_A[n].weight.detach() for n in ("a", "b")],
                   [math.copysign(math.sqrt(abs(v)), v) for v in ws], density)
        b = C.ties([layer.lora_B[n].weight.detach() for n in ("a", "b")],
                   [math.sqrt(abs(v)) for v in ws], density)
        torch.testing.assert_close(theirs[path], b @ a, atol=1e-6, rtol=0)
        assert not torch.allclose(theirs[path], ours[path], atol=1e-3)


def test_peft_cat_with_rslora_inputs_is_scaled_by_sqrt_rank(tiny_llama, tmp_path):
    """peft's composed config copies use_rslora from the first adapter while setting alpha = r,
    so its cat result is scaled by α/√r = √r instead of 1. Ours keeps scaling 1: exact."""
    model = copy.deepcopy(tiny_llama)
    rs = dict(rank=4, alpha=8, use_rslora=True, target_modules=TARGETS)
    add_adapters(model, {"a": splice.LoRAConfig(**rs), "b": splice.LoRAConfig(**rs)})
    weights = [1.0, 1.0]
    twin = peft_twin(tiny_llama, model, ["a", "b"], tmp_path)
    twin.add_weighted_adapter(["a", "b"], weights, "c", combination_type="cat")
    splice.compose_adapters(model, ["a", "b"], weights, "cat", new_name="c")
    exact = weighted_sum(model, ["a", "b"], weights)
    assert_deltas_close(splice_deltas(model, "c"), exact, atol=1e-6)
    assert_deltas_close(peft_deltas(twin, "c"), {p: math.sqrt(8) * d for p, d in exact.items()},
                        atol=1e-5)


# -- the result is an ordinary adapter ---------------------------------------------------------

def test_composed_adapter_saves_loads_in_peft_and_merges(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=TARGETS),
                         "b": splice.LoRAConfig(rank=4, target_modules=["q_proj", "o_proj"])})
    splice.compose_adapters(model, ["a", "b"], [1.0, -0.5], "ties", density=0.5, new_name="t")
    splice.set_active_adapters(model, "t")
    ids = token_ids(model)
    composed = logits(model, ids)
    assert not torch.allclose(composed, logits(tiny_llama, ids), atol=1e-3)

    folder = splice.save_adapter(model, tmp_path / "t", "t")
    twin = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), folder).eval()
    torch.testing.assert_close(logits(twin, ids), composed, atol=1e-5, rtol=0)
    fresh = copy.deepcopy(tiny_llama)
    splice.load_adapter(fresh, folder)
    torch.testing.assert_close(logits(fresh, ids), composed, atol=0, rtol=0)

    splice.merge_adapter(model, "t")
    torch.testing.assert_close(logits(model, ids), composed, atol=1e-5, rtol=0)


def test_composition_leaves_the_active_adapters_alone(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=TARGETS)})
    ids = token_ids(model)
    before = logits(model, ids)
    splice.compose_adapters(model, ["a"], [2.0], "linear", new_name="twice")
    assert splice.active_adapters(model) == ["a"]
    torch.testing.assert_close(logits(model, ids), before, atol=0, rtol=0)


@pytest.mark.parametrize("config", [splice.DoRAConfig(rank=4, target_modules=TARGETS),
                                    splice.IA3Config()], ids=["dora", "ia3"])
def test_only_lora_adapters_compose(config, tiny_llama):
    model = copy.deepcopy(tiny_llama)
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules=["o_proj"]), "a")
    splice.attach(model, config, "other")
    with pytest.raises(splice.AdapterError, match="only LoRA adapters compose"):
        splice.compose_adapters(model, ["a", "other"], [1.0, 1.0])
    assert set(splice.list_adapters(model)) == {"a", "other"}


def test_bad_requests_are_refused_before_any_change(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    add_adapters(model, {"a": splice.LoRAConfig(rank=4, target_modules=TARGETS)})
    with pytest.raises(splice.AdapterError, match="weight per adapter"):
        splice.compose_adapters(model, ["a"], [1.0, 2.0])
    with pytest.raises(splice.AdapterError, match="already has an adapter named 'a'"):
        splice.compose_adapters(model, ["a"], [1.0], new_name="a")
    with pytest.raises(splice.AdapterError, match="no adapter named 'x'"):
        splice.compose_adapters(model, ["x"], [1.0])
    with pytest.raises(ConfigError, match="needs a density"):
        splice.compose_adapters(model, ["a"], [1.0], "ties")
    assert set(splice.list_adapters(model)) == {"a"}

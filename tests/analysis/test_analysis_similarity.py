"""The cosine of two updates from their factors, against the dense flattened computation and
the closed cases: the same update 1, negated −1, independent ≈ 0."""

from __future__ import annotations

import pytest
import torch

from splice.analysis.similarity import Update, cosine, inner_product


def random_update(out: int, d_in: int, rank: int, seed: int, scaling: float = 1.0) -> Update:
    g = torch.Generator().manual_seed(seed)
    return Update(torch.randn(rank, d_in, generator=g), torch.randn(out, rank, generator=g),
                  scaling)


def dense_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("ranks", [(4, 4), (2, 8), (16, 1)])
def test_factor_inner_product_equals_the_dense_one(ranks):
    x = random_update(24, 40, ranks[0], 0, scaling=2.0)
    y = random_update(24, 40, ranks[1], 1, scaling=-0.5)
    dense = float((x.matrix() * y.matrix()).sum())
    assert inner_product(x, y) == pytest.approx(dense, rel=1e-9)
    assert cosine(x, y) == pytest.approx(dense_cosine(x.matrix(), y.matrix()), rel=1e-9)
    # a dense update meets a factored one: same numbers
    assert inner_product(Update(dense=x.matrix()), y) == pytest.approx(dense, rel=1e-9)


def test_identical_negated_and_rescaled_updates():
    x = random_update(32, 16, 4, 2, scaling=0.7)
    assert cosine(x, x) == pytest.approx(1.0, abs=1e-12)
    assert cosine(x, Update(x.a, -x.b, x.scaling)) == pytest.approx(-1.0, abs=1e-12)
    assert cosine(x, Update(x.a, x.b, -3.0)) == pytest.approx(-1.0, abs=1e-12)
    assert cosine(x, Update(x.a * 2, x.b, 5.0)) == pytest.approx(1.0, abs=1e-12)


def test_independent_random_updates_are_nearly_orthogonal():
    # ⟨ΔW₁, ΔW₂⟩ sums out·in products of independent zero-mean entries: its standard deviation
    # is 1/√(out·in) of ‖ΔW₁‖‖ΔW₂‖ (closed form for Gaussian factors).
    out, d_in = 64, 48
    bound = 4 / (out * d_in) ** 0.5
    cosines = [cosine(random_update(out, d_in, 8, 10 + i), random_update(out, d_in, 8, 50 + i))
               for i in range(5)]
    assert all(abs(c) < bound for c in cosines)
    assert max(abs(c) for c in cosines) > 1e-4        # not identically zero either


def test_a_zero_update_has_cosine_zero():
    x = random_update(8, 8, 2, 3)
    zero = Update(x.a, torch.zeros_like(x.b), 1.0)
    assert cosine(x, zero) == 0.0

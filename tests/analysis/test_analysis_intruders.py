"""Intruder dimensions: a planted rank-1 direction is found (exactly it), a small full-rank
"full fine-tune" update shows none, and the counts equal a literal loop over the paper's
definition for every ε of a sweep."""

from __future__ import annotations

import pytest
import torch

from splice.analysis.config import DEFAULT_EPSILONS, AnalysisConfig
from splice.analysis.intruders import BaseSVDCache, intruder_dimensions, left_singular_vectors
from splice.config.base import ConfigError


def pretrained_like(out: int, d_in: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W₀ = U₀ diag(σ) V₀ᵀ with random singular vectors and a decaying spectrum σᵢ = 10/i, as
    trained weights have (well-separated top singular values). Returns W₀, U₀, σ."""
    g = torch.Generator().manual_seed(seed)
    n = min(out, d_in)
    u0, _ = torch.linalg.qr(torch.randn(out, n, generator=g, dtype=torch.float64))
    v0, _ = torch.linalg.qr(torch.randn(d_in, n, generator=g, dtype=torch.float64))
    sigma = 10.0 / torch.arange(1, n + 1, dtype=torch.float64)
    return (u0 * sigma) @ v0.T, u0, sigma


def reference_counts(w0: torch.Tensor, w_tuned: torch.Tensor, top_k: int,
                     epsilons: tuple[float, ...]) -> dict[float, int]:
    """The paper's Algorithm 1, literally: for each of the top k tuned vectors, an intruder if
    every pre-trained singular vector has |cos| below ε."""
    u0 = torch.linalg.svd(w0.double(), full_matrices=False)[0]
    u_t = torch.linalg.svd(w_tuned.double(), full_matrices=False)[0]
    counts = {}
    for epsilon in epsilons:
        n = 0
        for j in range(top_k):
            if all(abs(float(u0[:, i] @ u_t[:, j])) < epsilon for i in range(u0.shape[1])):
                n += 1
        counts[epsilon] = n
    return counts


@pytest.mark.parametrize("out, d_in", [(128, 128), (192, 96), (96, 192)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_planted_direction_is_the_one_intruder(out, d_in, seed):
    w0, u0, sigma = pretrained_like(out, d_in, seed)
    # u has the same small overlap 1/√n with every singular vector of W₀ (orthogonal-ish to all
    # of them); its strength sits between σ₁ and σ₂, so it enters the top k at position 2.
    u = u0.sum(1) / u0.sum(1).norm()
    v = torch.randn(d_in, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
    v = v / v.norm()
    w_tuned = w0 + (sigma[0] + sigma[1]) / 2 * torch.outer(u, v)
    found = intruder_dimensions(w0.float(), w_tuned.float(), top_k=10)
    assert found.counts[0.5] == 1
    assert found.intruder_indices(0.5) == [1]
    planted = left_singular_vectors(w_tuned)[:, 1]
    assert abs(float(planted @ u.float())) > 0.85          # the intruder is the planted direction
    # W₀'s own top directions survive: every other top-10 vector matches one of W₀'s closely.
    assert min(c for j, c in enumerate(found.max_cosines) if j != 1) > 0.9


@pytest.mark.parametrize("out, d_in", [(128, 128), (192, 96)])
def test_a_small_full_rank_update_has_no_intruders(out, d_in):
    """Full fine-tuning moves every entry a little: a dense, full-rank update of 3% of ‖W₀‖_F
    turns no top singular vector away from W₀'s."""
    w0, _, sigma = pretrained_like(out, d_in, seed=3)
    g = torch.Generator().manual_seed(4)
    # gradient-like: a sum of many small outer products of activations and output gradients
    delta = sum(torch.outer(torch.randn(out, generator=g, dtype=torch.float64),
                            torch.randn(d_in, generator=g, dtype=torch.float64)) for _ in range(64))
    delta = delta / delta.norm() * 0.03 * w0.norm()
    found = intruder_dimensions(w0.float(), (w0 + delta).float(), top_k=10)
    assert found.counts[0.5] == 0
    assert all(c == 0 for e, c in found.counts.items() if e <= 0.5)
    assert min(found.max_cosines) > 0.9


def test_the_sweep_matches_the_literal_definition():
    g = torch.Generator().manual_seed(5)
    w0 = torch.randn(40, 24, generator=g, dtype=torch.float64)
    b, a = torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randn(4, 24, generator=g,
                                                                             dtype=torch.float64)
    w_tuned = w0 + 0.8 * b @ a
    found = intruder_dimensions(w0, w_tuned, top_k=8)
    assert found.counts == reference_counts(w0, w_tuned, 8, DEFAULT_EPSILONS)
    assert sum(found.counts.values()) > 0        # the case exercises both outcomes
    counts = [found.counts[e] for e in DEFAULT_EPSILONS]
    assert counts == sorted(counts)              # a larger ε can only count more
    assert found.count(0.45) == sum(c < 0.45 for c in found.max_cosines)


def test_top_k_is_capped_at_the_matrix_rank_and_shapes_must_match():
    w0 = torch.randn(6, 4)
    assert len(intruder_dimensions(w0, w0 + 0.1, top_k=10).max_cosines) == 4
    with pytest.raises(ValueError, match="same matrix"):
        intruder_dimensions(w0, torch.randn(4, 6))
    with pytest.raises(ValueError, match="at least one"):
        intruder_dimensions(w0, w0, top_k=0)


def test_the_base_svd_is_computed_once_per_base_weight_version():
    weight = torch.nn.Parameter(torch.randn(20, 12), requires_grad=False)
    cache = BaseSVDCache()
    first = cache.left_vectors(weight)
    assert cache.left_vectors(weight) is first and cache.misses == 1
    transposed = cache.left_vectors(weight, transpose=True)
    assert transposed.shape == (12, 12) and cache.misses == 2
    with torch.no_grad():
        weight.add_(1.0)                         # an in-place change: W₀ is another matrix now
    again = cache.left_vectors(weight)
    assert cache.misses == 3
    torch.testing.assert_close(again.abs(), left_singular_vectors(weight).abs())


@pytest.mark.parametrize("kwargs, message", [
    ({"top_k": 0}, "top_k=0"), ({"epsilons": ()}, "epsilons"),
    ({"epsilons": (0.5, 1.5)}, "1.5"), ({"epsilon": 0.0}, "0.0"),
])
def test_analysis_config_names_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AnalysisConfig(**kwargs)


def test_analysis_config_sorts_the_sweep():
    assert AnalysisConfig(epsilons=[0.7, 0.3, 0.7]).epsilons == (0.3, 0.7)

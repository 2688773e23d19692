"""ΔW spectra from LoRA factors against a dense SVD, and the effective-rank definitions against
their closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from splice.analysis.spectrum import (Spectrum, dense_singular_values, energy_rank,
                                      entropy_effective_rank, factor_singular_values)


@pytest.mark.parametrize("out, d_in, rank, scaling", [
    (48, 32, 4, 2.0), (32, 48, 8, 0.5), (16, 24, 20, 1.0),   # rank above min(out, in)
    (40, 40, 6, -1.5),                                       # a negative scale: |s|·σ
])
def test_factor_spectrum_equals_the_dense_svd(out, d_in, rank, scaling):
    g = torch.Generator().manual_seed(out + d_in + rank)
    a, b = torch.randn(rank, d_in, generator=g), torch.randn(out, rank, generator=g)
    dense = torch.linalg.svdvals((b.double() @ a.double()) * scaling)
    values = factor_singular_values(a, b, scaling)
    assert values.shape == (min(rank, out, d_in),)
    torch.testing.assert_close(values.double(), dense[:len(values)], rtol=1e-5, atol=1e-5)
    assert (values[:-1] >= values[1:]).all()


def test_factor_spectrum_of_a_rank_deficient_update_has_zeros():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 30, generator=g), torch.randn(20, 6, generator=g)
    b[:, 4:] = 0                                     # only 4 directions in use
    values = factor_singular_values(a, b, 1.0)
    torch.testing.assert_close(values.double(), torch.linalg.svdvals(b.double() @ a.double())[:6],
                               rtol=1e-5, atol=1e-5)
    assert (values[4:] < 1e-5 * values[0]).all()
    assert energy_rank(values, 0.99) <= 4


def test_dense_spectrum_is_svdvals():
    delta = torch.randn(12, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dense_singular_values(delta), torch.linalg.svdvals(delta))


def test_entropy_rank_closed_forms():
    assert entropy_effective_rank(torch.ones(8)) == pytest.approx(8.0)
    assert entropy_effective_rank(torch.tensor([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert entropy_effective_rank(torch.zeros(4)) == 0.0
    p = torch.tensor([0.75, 0.25])                   # σ = (3, 1)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert entropy_effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(expected)
    assert entropy_effective_rank(p * 7) == pytest.approx(expected)   # scale-free


def test_energy_rank_closed_forms():
    values = torch.tensor([3.0, 1.0])                # energies 9 and 1: 90% in the first
    assert energy_rank(values, 0.9) == 1
    assert energy_rank(values, 0.99) == 2
    assert energy_rank(torch.ones(10), 0.9) == 9
    assert energy_rank(torch.ones(10), 0.99) == 10
    assert energy_rank(torch.zeros(3), 0.9) == 0


def test_spectrum_record_norm_is_frobenius():
    delta = torch.randn(9, 5, generator=torch.Generator().manual_seed(2))
    spectrum = Spectrum.of(dense_singular_values(delta))
    assert spectrum.norm == pytest.approx(float(delta.norm()), rel=1e-5)
    assert set(spectrum.energy_ranks) == {0.9, 0.99}
    assert 1.0 <= spectrum.entropy_rank <= 5.0

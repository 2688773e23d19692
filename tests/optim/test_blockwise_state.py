"""Blockwise 8-bit state quantization: the maps, exact nearest rounding, closed-form error bounds.

Oracles: bitsandbytes' create_dynamic_map for the unsigned map's values, a dense argmin over
all 256 map values for the codes, per-block maxima recomputed directly for the scales.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.optim.blockwise import (QuantMap, dequantize_blockwise, quantize_blockwise,
                                    signed_dynamic_map, unsigned_dynamic_map)

# Widest gap of each map: its top decade [0.1, 1] cut into 64 (signed) or 128 (unsigned) steps.
SIGNED_GAP, UNSIGNED_GAP = 0.9 / 64, 0.9 / 128
MAPS = {"signed": (signed_dynamic_map, SIGNED_GAP), "unsigned": (unsigned_dynamic_map, UNSIGNED_GAP)}


def test_unsigned_map_equals_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(unsigned_dynamic_map(), bnbf.create_dynamic_map(signed=False))


@pytest.mark.parametrize("kind", MAPS)
def test_map_shape_and_widest_gap(kind):
    make, gap = MAPS[kind]
    code = make()
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.all(code[1:] > code[:-1])  # sorted, distinct
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    assert code.min() >= (0.0 if kind == "unsigned" else -1.0)
    assert float((code[1:] - code[:-1]).max()) == pytest.approx(gap, rel=1e-4)  # fp32 rounding


def dense_reference(x: torch.Tensor, code: torch.Tensor, bs: int):
    """Codes by argmin over all map values (first = lower on ties), absmax by direct max."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    absmax = torch.stack([flat[i:i + bs].abs().max() for i in range(0, n, bs)])  # (nb,)
    scale = absmax.repeat_interleave(bs)[:n]  # (n,)
    scaled = flat / scale.clamp(min=1e-38)
    codes = (scaled[:, None] - code[None, :]).abs().argmin(dim=1)  # (n,)
    return codes.to(torch.uint8), absmax, scale


def check_round_trip(x: torch.Tensor, kind: str, bs: int) -> None:
    make, gap = MAPS[kind]
    code = make()
    qmap = QuantMap.from_values(code)
    codes, absmax = quantize_blockwise(x, qmap, bs)
    ref_codes, ref_absmax, scale = dense_reference(x, code, bs)
    assert codes.dtype == torch.uint8 and codes.shape == (x.numel(),)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(codes, ref_codes)
    decoded = dequantize_blockwise(codes, absmax, qmap, bs)
    assert torch.equal(decoded, code[codes.long()] * scale)  # x̂_i = MAP[c_i] · a_b
    error = (decoded - x.reshape(-1)).abs()
    # Nearest rounding: within half the gap around each value, so within half the widest gap.
    assert torch.all(error <= scale * (gap / 2) * (1 + 1e-4) + 1e-30)  # 1e-4: fp32 map values


@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("n, bs", [(4096, 256), (1000, 256), (5, 256), (300, 64), (2048, 2048)])
def test_round_trip_within_closed_form_bound(kind, n, bs):
    g = torch.Generator().manual_seed(n + bs)
    x = torch.randn(n, generator=g) * torch.exp(3 * torch.randn(n, generator=g))  # heavy tails
    if kind == "unsigned":
        x = x.square()
    check_round_trip(x, kind, bs)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 700), st.sampled_from([16, 64, 256]), st.sampled_from(list(MAPS)),
       st.floats(1e-20, 1e6), st.integers(0, 2**31 - 1))
def test_round_trip_property(n, bs, kind, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * magnitude
    if kind == "unsigned":
        x = x.abs()
    check_round_trip(x, kind, bs)


def test_zero_block_stays_zero_and_outlier_stays_local():
    qmap = QuantMap.from_values(signed_dynamic_map())
    x = torch.zeros(768)
    x[256:512] = torch.linspace(-1e-3, 1e-3, 256)
    x[600] = 1e4  # an outlier only coarsens its own block
    codes, absmax = quantize_blockwise(x, qmap, 256)
    decoded = dequantize_blockwise(codes, absmax, qmap, 256)
    assert torch.equal(decoded[:256], torch.zeros(256)) and absmax[0] == 0
    # -1e-3 decodes to -0.99297e-3 (the map stops there): the bound with equality.
    assert (decoded[256:512] - x[256:512]).abs().max() <= 1e-3 * SIGNED_GAP / 2 * (1 + 1e-4)
    assert decoded[600] == 1e4


def test_out_writes_into_given_slices():
    qmap = QuantMap.from_values(unsigned_dynamic_map())
    x = torch.rand(512)
    codes, absmax = torch.zeros(1024, dtype=torch.uint8), torch.zeros(4)
    quantize_blockwise(x, qmap, 256, out=(codes[512:], absmax[2:]))
    ref_codes, ref_absmax = quantize_blockwise(x, qmap, 256)
    assert torch.equal(codes[512:], ref_codes) and torch.equal(absmax[2:], ref_absmax)
    assert not codes[:512].any() and not absmax[:2].any()


def cell_edges() -> torch.Tensor:
    """The lowest and highest fp32 value of every 16-bit cell within [-1, 1]."""
    cells = torch.arange(1 << 16, dtype=torch.int64)
    patterns = torch.cat([cells << 16, (cells << 16) | 0xFFFF])
    signed = torch.where(patterns >= 1 << 31, patterns - (1 << 32), patterns)
    values = signed.to(torch.int32).view(torch.float32)
    return values[values.abs() <= 1]


@pytest.mark.parametrize("kind", MAPS)
def test_lookup_table_equals_bucketize_on_every_edge(kind):
    """Midpoints exactly (ties take the lower code), one ulp either side, every cell's edges,
    and random values: the table lookup agrees with a binary search everywhere."""
    code = MAPS[kind][0]()
    mids = (code[:-1] + code[1:]) / 2
    g = torch.Generator().manual_seed(0)
    values = torch.cat([
        mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
        code, cell_edges(), torch.rand(100_000, generator=g) * 2 - 1,
        torch.tensor([0.0, -0.0, 1.0, -1.0]),
    ])
    if kind == "unsigned":
        values = values[values >= 0]
    expected = torch.bucketize(values, mids)
    assert torch.equal(QuantMap.from_values(code).codes(values).long(), expected)


def test_map_too_fine_for_the_table_is_refused():
    # midpoints 0.50005 and 0.50015 share the cell [0.5, 0.5039)
    crowded = torch.cat([torch.linspace(-1, 0.49, 252), torch.tensor([0.5, 0.5001, 0.5002, 1.0])])
    with pytest.raises(ValueError, match="two midpoints"):
        QuantMap.from_values(crowded)

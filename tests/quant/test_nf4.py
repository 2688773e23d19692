"""splice.quant.nf4 against bitsandbytes (the oracle), byte for byte, plus error-bound properties.

bitsandbytes 0.50 on CPU: quantize_4bit runs its generic torch path, the nested 8-bit
quantization of the absmax runs its C kernel (a 65,536-point grid, not an exact nearest
search), dequantize_4bit its C kernel.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.quant import (
    NF4_CODE,
    dequantize_nf4,
    from_state_dict,
    nf4_codebook,
    nf4_storage_bits,
    quantize_nf4,
    signed_dynamic_map,
    to_state_dict,
)

bnbf = pytest.importorskip("bitsandbytes.functional")

NF4_HALF_GAP = max(b - a for a, b in zip(NF4_CODE, NF4_CODE[1:])) / 2  # 0.1519
SHAPES = [(576, 576), (192, 576), (1536, 576), (7, 13), (1,), (63,), (65,), (64 * 256 + 5,),
          (3, 5, 7), (2,), (64 * 256 * 2 + 64,)]


def bnb_quantize(w: torch.Tensor, double_quant: bool):
    return bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=double_quant)


def bnb_dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    # For odd shapes bitsandbytes decodes with a torch.compile'd function that recompiles
    # per shape (seconds each); eager gives the same values.
    with torch.compiler.set_stance("force_eager"):
        return bnbf.dequantize_4bit(packed, state)


def closed_form_decode(q) -> torch.Tensor:
    """NF4[c_i] * a_b over the flat blocks, straight from the stored tensors (fp32)."""
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1)[: q.numel].long()
    if q.double_quant:
        scale = q.nested_absmax.repeat_interleave(q.double_block_size)[: q.n_blocks]
        absmax = signed_dynamic_map()[q.absmax.long()] * scale + q.offset
    else:
        absmax = q.absmax
    scale = absmax.repeat_interleave(q.block_size)[: q.numel]
    return (nf4_codebook()[codes] * scale).view(q.shape)


def assert_same_bytes(w: torch.Tensor, double_quant: bool, bnb_decode: bool = True) -> None:
    """Our NF4Weight holds exactly bitsandbytes' tensors, and both decode to the same values."""
    packed, state = bnb_quantize(w, double_quant)
    q = quantize_nf4(w, double_quant=double_quant)
    assert torch.equal(q.packed, packed.view(-1))
    assert torch.equal(q.absmax, state.absmax)  # fp32, or uint8 codes with double quant
    if double_quant:
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.offset, state.offset)
    ours = dequantize_nf4(q, dtype=w.dtype)
    torch.testing.assert_close(ours, closed_form_decode(q).to(w.dtype), rtol=0, atol=0)
    if bnb_decode:
        theirs = bnb_dequantize(packed, state).reshape(w.shape)  # in w.dtype
        # In practice bit-identical (one fp32 product per element, then a cast).
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


# --- codebooks ---------------------------------------------------------------------------


def test_nf4_codebook_matches_bitsandbytes():
    assert torch.equal(nf4_codebook(), bnbf.get_4bit_type("nf4", device="cpu"))
    assert NF4_CODE[7] == 0.0 and len(NF4_CODE) == 16


def test_signed_dynamic_map_matches_bitsandbytes():
    ours = signed_dynamic_map()
    assert ours.shape == (256,) and ours.dtype == torch.float32
    assert torch.equal(ours, bnbf.create_dynamic_map(signed=True))


# --- byte-exact against the oracle ---------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bytes_match_bitsandbytes(shape, double_quant):
    torch.manual_seed(sum(shape))
    assert_same_bytes(torch.randn(shape) * 0.02, double_quant)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_match_bitsandbytes(dtype, double_quant):
    torch.manual_seed(0)
    assert_same_bytes(torch.randn(192, 64).to(dtype), double_quant)


@pytest.mark.parametrize("scale", [1e-30, 1e-4, 1.0, 1e4, 1e30])
def test_extreme_scales_match_bitsandbytes(scale):
    torch.manual_seed(1)
    assert_same_bytes(torch.randn(130, 64) * scale, double_quant=True)


def test_zero_blocks_match_bitsandbytes():
    """An all-zero block has absmax 0 (codes 7); equal absmax everywhere gives scale 0."""
    w = torch.zeros(64 * 5 + 3)
    w[64:128] = torch.linspace(-1, 1, 64)
    assert_same_bytes(w, double_quant=False)
    assert_same_bytes(w, double_quant=True)
    assert_same_bytes(torch.ones(64 * 300), double_quant=True)  # a_b - o == 0 everywhere
    assert_same_bytes(-torch.zeros(64 * 2 + 1), double_quant=False)


def test_non_contiguous_weight_quantizes_in_logical_order():
    torch.manual_seed(2)
    w = torch.randn(96, 130).t()  # (130, 96), not contiguous
    # Bytes only: bitsandbytes 0.50's AVX-512 CPU decoder reads the wrong absmax when rows
    # straddle blocks (last dim a multiple of 16 but not of 64, as 96 here); see
    # test_rows_that_straddle_blocks_decode_by_flat_blocks.
    assert_same_bytes(w, double_quant=True, bnb_decode=False)


def test_rows_that_straddle_blocks_decode_by_flat_blocks():
    """A (130, 96) weight: block b covers flat elements 64b..64b+63, across row ends.

    bitsandbytes' AVX-512 CPU kernel indexes absmax as [row, col // 64] in this case and
    returns wrong values (errors up to ~4x the NF4 bound); its scalar and torch paths, and
    ours, use the flat block. We check ours against the closed form and the error bound.
    """
    torch.manual_seed(5)
    w = torch.randn(130, 96)
    q = quantize_nf4(w, double_quant=False)
    out = dequantize_nf4(q)
    assert torch.equal(out, closed_form_decode(q))
    bound = q.absmax.repeat_interleave(64).view(130, 96) * (NF4_HALF_GAP + 1e-6)
    assert bool(((out - w).abs() <= bound).all())


# --- rounding details (documented, because they surprised us) ------------------------------


def test_midpoint_ties_take_the_lower_code():
    """x exactly halfway between two NF4 values gets the lower code (torch.bucketize's rule)."""
    code = nf4_codebook()
    mids = (code[:-1] + code[1:]) / 2  # (15,)
    block = torch.cat([torch.ones(1), mids, torch.zeros(48)])  # absmax 1: scaled == x
    q = quantize_nf4(block, double_quant=False)
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).view(-1)
    assert codes[0] == 15
    assert codes[1:16].tolist() == list(range(15))
    assert_same_bytes(block, double_quant=False)


def test_values_next_to_midpoints_and_cell_edges_match_bitsandbytes():
    """Adversarial scaled values: each midpoint +/- one ulp, signed zeros, powers of two."""
    code = nf4_codebook()
    mids = (code[:-1] + code[1:]) / 2
    up = torch.nextafter(mids, torch.full_like(mids, 2.0))
    down = torch.nextafter(mids, torch.full_like(mids, -2.0))
    powers = torch.tensor([2.0**-k for k in range(0, 127, 3)])
    values = torch.cat([mids, up, down, powers, -powers, torch.tensor([0.0, -0.0, 1e-45])])
    values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))]
    blocks = torch.nn.functional.pad(values, (0, -values.numel() % 63)).view(-1, 63)
    w = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1)  # absmax 1 per block
    assert_same_bytes(w, double_quant=False)


def test_odd_numel_pads_with_the_zero_code():
    """bitsandbytes pads an odd-length weight with 0.0, whose code is 7, not 0."""
    q = quantize_nf4(torch.tensor([1.0, -1.0, 0.5]), double_quant=False)
    # 0.5 lies just below the midpoint 0.5016 of NF4[12] = 0.4407 and NF4[13] = 0.5626.
    assert q.packed.tolist() == [0xF0, (12 << 4) | 7]
    assert_same_bytes(torch.tensor([1.0, -1.0, 0.5]), double_quant=False)


def test_nested_absmax_uses_the_grid_rule_not_the_nearest_value():
    """Block absmax 1, 2, 3: offset 2, group scale 1, normalised (-1, 0, 1).

    The exact nearest map entry to 0 is 0 itself (index 127); bitsandbytes' CPU kernel first
    rounds 0 onto its 65,536-point grid (+1.5e-5) and picks +2.1e-5 (index 131). We match it.
    """
    w = torch.tensor([1.0, 2.0, 3.0]).repeat_interleave(64)
    q = quantize_nf4(w, double_quant=True)
    dyn = signed_dynamic_map()
    assert q.absmax.tolist() == [0, 131, 255]
    assert dyn[127] == 0.0 and dyn[131] == pytest.approx(2.125e-5)
    assert_same_bytes(w, double_quant=True)


# --- properties --------------------------------------------------------------------------

def nested_scale_error(q) -> torch.Tensor:
    """Bound on |a_b - decoded a_b| per block: half the widest dynamic-map gap plus the grid
    step (see Note: Nested absmax rounding), times the group scale."""
    dyn = signed_dynamic_map()
    half_gap = float((dyn[1:] - dyn[:-1]).max()) / 2
    scale = q.nested_absmax.repeat_interleave(q.double_block_size)[: q.n_blocks]
    return scale * (half_gap + 2.0 / 65535) * (1 + 1e-6)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple),
    log_scale=st.floats(-6, 6),
    double_quant=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_error_is_within_half_the_widest_code_gap(shape, log_scale, double_quant, seed):
    """|w - deq(q(w))| <= (0.1519 + eps) * a_b  (+ |a_b - decoded a_b| with double quant)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 10.0**log_scale
    q = quantize_nf4(w, double_quant=double_quant)
    err = (dequantize_nf4(q) - w).abs().reshape(-1)
    flat = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % 64))
    absmax = flat.view(-1, 64).abs().amax(dim=1)  # (n_blocks,), true fp32 absmax
    bound = absmax * (NF4_HALF_GAP + 1e-6)
    if double_quant:
        bound = bound + nested_scale_error(q)
    bound = bound.repeat_interleave(64)[: w.numel()]
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_quantization_gives_the_same_bytes(dtype):
    torch.manual_seed(3)
    w = torch.randn(192, 576 + 3).to(dtype)  # numel not a multiple of 64: a short last block
    whole = quantize_nf4(w, chunk_elements=1 << 24)
    for chunk in (64, 100, 64 * 7):  # one block, a non-multiple, an odd number of blocks
        part = quantize_nf4(w, chunk_elements=chunk)
        for name, t in to_state_dict(whole)[0].items():
            assert torch.equal(t, to_state_dict(part)[0][name]), (chunk, name)
        assert torch.equal(dequantize_nf4(part, dtype, chunk_elements=chunk),
                           dequantize_nf4(whole, dtype))


# --- storage -----------------------------------------------------------------------------


def test_storage_bits_per_parameter():
    w = torch.randn(4096, 4096)
    with_dq = nf4_storage_bits(quantize_nf4(w, double_quant=True))
    without = nf4_storage_bits(quantize_nf4(w, double_quant=False))
    assert math.isclose(with_dq, 4 + 8 / 64 + 32 / (64 * 256), abs_tol=1e-3)  # 4.127
    assert math.isclose(without, 4 + 32 / 64, abs_tol=1e-3)  # 4.5


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_state_dict_roundtrips_through_safetensors(tmp_path, double_quant):
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(4)
    w = torch.randn(7, 13).to(torch.bfloat16)
    q = quantize_nf4(w, double_quant=double_quant)
    tensors, metadata = to_state_dict(q, prefix="layer.0.")
    save_file(tensors, tmp_path / "w.safetensors", metadata=metadata)
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        loaded = {k: f.get_tensor(k) for k in f.keys()}
        back = from_state_dict(loaded, f.metadata(), prefix="layer.0.")
    assert back.shape == (7, 13) and back.dtype == torch.bfloat16
    assert back.double_quant == double_quant
    assert torch.equal(dequantize_nf4(back), dequantize_nf4(q))


def test_dequantize_returns_shape_and_dtype():
    q = quantize_nf4(torch.randn(3, 5, 7))
    out = dequantize_nf4(q, dtype=torch.bfloat16)
    assert out.shape == (3, 5, 7) and out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize_nf4(q).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_dequantize_into_out_overwrites_and_returns_it(dtype, double_quant):
    """out= gives the fresh result's values exactly, in the buffer passed, whatever it held."""
    torch.manual_seed(6)
    w = torch.randn(64 * 256 + 40, 3)  # a partial nested group and a short last NF4 block
    q = quantize_nf4(w, double_quant=double_quant)
    out = torch.full(w.shape, float("nan"), dtype=dtype)
    got = dequantize_nf4(q, out=out, chunk_elements=64 * 100)  # dtype taken from out
    assert got is out
    assert torch.equal(out, closed_form_decode(q).to(dtype))


@pytest.mark.parametrize("block_size", [32, 128])
def test_other_block_sizes_match_bitsandbytes(block_size):
    torch.manual_seed(8)
    w = torch.randn(40, 256)  # rows hold whole blocks (see test_rows_that_straddle_blocks_...)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=block_size,
                                       compress_statistics=False)
    q = quantize_nf4(w, block_size=block_size, double_quant=False)
    assert torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)
    with torch.compiler.set_stance("force_eager"):
        theirs = bnbf.dequantize_4bit(packed, state)
    assert torch.equal(dequantize_nf4(q), theirs)


@pytest.mark.parametrize("block_size", [2, 6])
@pytest.mark.parametrize("chunk", [2, 18, 1 << 20])
def test_tiny_block_sizes_decode_by_the_closed_form(block_size, chunk):
    """Blocks of 1 or 3 bytes: chunks whose byte count is odd, or not a multiple of 64."""
    torch.manual_seed(9)
    w = torch.randn(7, 9)  # 63 elements: a short last block for both sizes
    q = quantize_nf4(w, block_size=block_size)
    for dtype in (torch.float32, torch.bfloat16):
        out = dequantize_nf4(q, dtype, chunk_elements=chunk)
        assert torch.equal(out, closed_form_decode(q).to(dtype))


def test_dequantize_into_out_at_an_odd_offset():
    """An fp32 buffer at an odd element offset cannot be viewed as int64 pairs; still exact."""
    torch.manual_seed(7)
    w = torch.randn(96, 64)
    q = quantize_nf4(w, double_quant=False)
    storage = torch.zeros(w.numel() + 1)
    out = storage[1:].view(w.shape)  # (96, 64), storage offset 1
    dequantize_nf4(q, torch.float32, out=out)
    assert torch.equal(out, closed_form_decode(q))
    assert storage[0] == 0.0


@pytest.mark.parametrize(
    ("make_out", "kwargs", "message"),
    [
        (lambda: torch.empty(6, 10), {}, "shape"),
        (lambda: torch.empty(6, 10).t(), {}, "contiguous"),
        (lambda: torch.empty(6, 10, dtype=torch.int32).view(10, 6), {}, "float32/float16"),
        (lambda: torch.empty(10, 6), {"dtype": torch.bfloat16}, "dtype"),
        (lambda: torch.empty(10, 6), {"chunk_elements": 0}, "chunk_elements"),
    ],
)
def test_bad_dequantize_out_raises_a_named_error(make_out, kwargs, message):
    q = quantize_nf4(torch.randn(10, 6))
    with pytest.raises(ValueError, match=message):
        dequantize_nf4(q, out=make_out(), **kwargs)


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weight", "kwargs", "message"),
    [
        (torch.ones(4, dtype=torch.int32), {}, "float32/float16/bfloat16"),
        (torch.ones(0), {}, "empty"),
        (torch.ones(64), {"block_size": 63}, "positive even"),
        (torch.ones(64), {"double_block_size": 0}, "double_block_size"),
        (torch.tensor([1.0, float("nan")]), {}, "NaN or inf"),
        (torch.tensor([1.0, float("inf")]), {}, "NaN or inf"),
    ],
)
def test_bad_input_raises_a_named_error(weight, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_nf4(weight, **kwargs)

"""NF4 (4-bit NormalFloat) weight quantization, byte-compatible with bitsandbytes.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) stores a frozen weight W as 4-bit codes:

    W is flattened and cut into blocks of ``block_size`` (64) elements;
    a_b = max |W_i| over block b                        (the block's absmax, fp32)
    c_i = argmin_k |W_i / a_b - NF4[k]|                 (a 4-bit code, 0..15)
    W_i ~= NF4[c_i] * a_b

Double quantization stores the absmax values themselves in 8 bits:

    o   = mean_b a_b                                    (one fp32 offset)
    s_g = max |a_b - o| over group g of 256 blocks      (fp32, one per group)
    e_b = 8-bit dynamic-map code of (a_b - o) / s_g
    a_b ~= DYN[e_b] * s_g + o

Storage: 4 + 32/64 = 4.5 bits per parameter without double quantization,
4 + 8/64 + 32/(64*256) ~= 4.127 with it.

Everything here is a pure tensor function on whatever device the weight lives on; the
byte layout (packing order, padding, rounding rules) matches bitsandbytes 0.50 so that the
packed tensors can be exchanged with it. The tests check this byte for byte.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NF4_CODE",
    "NF4Weight",
    "dequantize_nf4",
    "from_state_dict",
    "nf4_codebook",
    "nf4_storage_bits",
    "quantize_nf4",
    "signed_dynamic_map",
    "to_state_dict",
]

# The 16 NF4 values (QLoRA appendix E): quantiles of N(0, 1) rescaled to [-1, 1], with an
# exact zero. Index = 4-bit code.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TINY = 1e-38  # an all-zero block is scaled by 1/_TINY instead of 1/0 (bitsandbytes does too)
DEFAULT_CHUNK_ELEMENTS = 1 << 20  # quantize: 14 bytes of scratch per element, 14 MB
DEFAULT_DEQUANT_CHUNK_ELEMENTS = 1 << 20  # dequantize: 4 bytes per element (8 if not fp32), 4 MB

# Note: Quantize in chunks
# Quantizing touches every element several times (scale, look up, compare, pack) and each
# step, done on the whole matrix at once, would allocate a full-size fp32 or int temporary:
# for a 4096x11008 weight that is ~180 MB per step, several times the 4-bit result. We walk
# the flattened weight in chunks of whole blocks (2^20 elements, 4 MB of fp32, by default)
# and run every step into scratch tensors allocated once per call and reused (out=, in
# place): a fresh large tensor is slow on CPU, each first touch of a page faults (here,
# allocating an int32 copy of 8M bytes costs 6x more than filling an existing one). Each
# chunk's codes and absmax go straight into the preallocated outputs. Dequantization does
# the same in reverse (see Note: Dequantize by byte-pair gather); its scratch is an int64
# copy of the bytes, 4 bytes per element. Chunks should not be much shorter: each op costs a
# thread fork/join (ms each when other processes compete for the cores). The result does not
# depend on the chunk size: every block is quantized on its own, and only the
# double-quantization offset (a mean over all blocks) needs the whole absmax vector, which
# is small (numel / 64 floats).


@dataclass(frozen=True)
class NF4Weight:
    """A weight quantized to NF4: bitsandbytes' tensors and bytes (its packed is (n, 1), ours 1-D).

    packed:        uint8 (ceil(numel / 2),): two 4-bit codes per byte, first in the high nibble.
    absmax:        fp32 (n_blocks,) block scales, or uint8 (n_blocks,) codes into the signed
                   dynamic map when double quantized.
    shape, dtype:  the original weight's shape and dtype.
    block_size:    elements per NF4 block (64 in QLoRA).
    nested_absmax: fp32 (ceil(n_blocks / double_block_size),) group scales, or None.
    offset:        fp32 0-dim tensor, mean of the fp32 absmax, or None.
    double_block_size: blocks per group of the nested quantization (256 in QLoRA).
    """

    packed: Tensor
    absmax: Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int = 64
    nested_absmax: Tensor | None = None
    offset: Tensor | None = None
    double_block_size: int = 256

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block_size)


# --- codebooks -------------------------------------------------------------------------


def nf4_codebook(device: torch.device | str | None = None) -> Tensor:
    """The 16 NF4 values as an fp32 tensor, index = code."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def signed_dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015, arXiv:1511.04561), 256 sorted values.

    A dynamic exponent trades fraction bits for range. Level i = 0..6 holds 2^i magnitudes:
    the midpoints of 2^i equal steps of [0.1, 1], times 10^(i-6); each with both signs.
    That is 2 * (1 + 2 + ... + 64) = 254 values; 0 and 1 complete the 256. Smallest
    magnitude 5.5e-7, largest below 1: 0.993. All arithmetic in fp32, as the reference does.
    """
    values = [torch.zeros(1), torch.ones(1)]
    for level in range(7):
        edges = torch.linspace(0.1, 1, 2**level + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0  # (2^level,)
        scaled = (10 ** (level - 6)) * mids
        values += [scaled, -scaled]
    return torch.cat(values).sort().values.to(device)


# --- NF4 code lookup -------------------------------------------------------------------

# Note: NF4 code lookup by bit pattern
# The code of a scaled value x in [-1, 1] is the number of midpoints between neighbouring
# NF4 values that lie strictly below x (torch.bucketize's convention, which bitsandbytes
# uses: x exactly on a midpoint takes the LOWER code). A binary search per element is slow
# on CPU, so we index a table by the top 16 bits of x's fp32 pattern (sign, exponent, 7
# mantissa bits), read as an unsigned integer. Each such cell is an interval of reals
# holding at most one midpoint m (checked when the table is built), so
#     code(x) = (midpoints below the cell) + (x > m)
# is exact: two table reads, one compare (m = +inf in cells without a midpoint).
# Example: x = 0.7 has bits 0x3F333333; its cell 0x3F33 spans [0.69921875, 0.703125), which
# holds no midpoint; 14 midpoints lie below it, so code = 14 (NF4[14] = 0.723). For
# x = 0.644 (0x3F24DD2F), cell 0x3F24 = [0.640625, 0.64453125) holds m = 0.6428 (between
# NF4[13] and NF4[14]); 13 midpoints lie below the cell and x > m, so code = 14.


@functools.lru_cache(maxsize=8)
def _nf4_cell_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """Per 16-bit cell: (midpoints below it, uint8 (65536,); the midpoint inside or +inf)."""
    code = nf4_codebook()
    mids = (code[:-1] + code[1:]) / 2  # (15,) in fp32, like the reference
    cells = torch.arange(1 << 16, dtype=torch.int64)
    first = _as_float32(cells << 16)  # lowest bit pattern of each cell
    last = _as_float32((cells << 16) | 0xFFFF)
    lo, hi = torch.minimum(first, last), torch.maximum(first, last)  # negatives run backwards
    below_lo = torch.bucketize(lo, mids)  # midpoints < lo
    below_hi = torch.bucketize(hi, mids)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    if int((below_hi - below_lo)[finite].max()) > 1:
        raise RuntimeError("an NF4 lookup cell holds two midpoints; the table needs more bits")
    inner = torch.cat([mids, torch.tensor([float("inf")])])[below_lo]  # (65536,)
    return below_lo.to(torch.uint8).to(device), inner.to(device)


def _as_float32(bits: Tensor) -> Tensor:
    """fp32 values of unsigned 32-bit patterns held in int64."""
    signed = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return signed.to(torch.int32).view(torch.float32)


@dataclass(frozen=True)
class _Scratch:
    """Chunk-sized work tensors, reused across chunks (see Note: Quantize in chunks)."""

    scaled: Tensor  # fp32 (m,): x / absmax
    cell: Tensor  # int32 (m,): lookup cell of each value
    inner: Tensor  # fp32 (m,): the midpoint inside that cell
    above: Tensor  # bool (m,): value > that midpoint
    codes: Tensor  # uint8 (m,)

    @staticmethod
    def allocate(m: int, device: torch.device) -> _Scratch:
        def empty(dtype: torch.dtype) -> Tensor:
            return torch.empty(m, dtype=dtype, device=device)

        return _Scratch(empty(torch.float32), empty(torch.int32), empty(torch.float32),
                        empty(torch.bool), empty(torch.uint8))

    def first(self, m: int) -> _Scratch:
        """Views of the first m elements, for a shorter chunk."""
        return _Scratch(*(getattr(self, f.name)[:m] for f in dataclasses.fields(self)))


def _nf4_codes(work: _Scratch) -> Tensor:
    """uint8 NF4 codes of ``work.scaled`` (fp32 values already divided by their absmax).

    Equals torch.bucketize(work.scaled, midpoints); see Note: NF4 code lookup by bit pattern.
    """
    below, inner = _nf4_cell_tables(work.scaled.device)
    # The high half of each little-endian fp32, unsigned, widened to an index: (m,) int32.
    work.cell.copy_(work.scaled.view(torch.uint16)[1::2])
    torch.index_select(below, 0, work.cell, out=work.codes)
    torch.index_select(inner, 0, work.cell, out=work.inner)
    torch.gt(work.scaled, work.inner, out=work.above)
    return work.codes.add_(work.above)


def _pack_nibbles(codes: Tensor, out: Tensor) -> None:
    """Pack an even number of 4-bit codes into bytes, the first code in the high nibble.

    [3, 12, 7, 7] -> [0x3C, 0x77]: byte j = 16 * codes[2j] + codes[2j + 1] (no carry: < 256).
    """
    torch.add(codes[1::2], codes[0::2], alpha=16, out=out)


# --- quantize ----------------------------------------------------------------------------


def quantize_nf4(
    weight: Tensor,
    block_size: int = 64,
    double_quant: bool = True,
    double_block_size: int = 256,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> NF4Weight:
    """Quantize a weight to NF4 blocks of ``block_size`` along its flattened (row-major) order.

    Returns the same bytes as ``bitsandbytes.functional.quantize_4bit(weight,
    quant_type="nf4", blocksize=block_size, compress_statistics=double_quant)``.
    A last block shorter than ``block_size`` gets its own absmax; an odd element count is
    padded with one zero (code 7, the padding nibble). ``chunk_elements`` bounds the size
    of temporaries (see Note: Quantize in chunks); it does not change the result.
    """
    _check_quantize_args(weight, block_size, double_block_size, chunk_elements)
    flat = weight.reshape(-1)  # a view for contiguous weights; otherwise one copy
    n, device = flat.numel(), weight.device
    n_full = n // block_size
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=device)
    step = max(1, chunk_elements // block_size)  # whole blocks per chunk
    work = _Scratch.allocate(min(step, n_full) * block_size, device) if n_full else None
    for b0 in range(0, n_full, step):
        b1 = min(b0 + step, n_full)
        chunk = work.first((b1 - b0) * block_size)
        _quantize_full_blocks(flat, b0, b1, block_size, chunk, packed, absmax)
    if n_full * block_size < n:
        _quantize_last_block(flat, n_full * block_size, packed, absmax)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("weight holds NaN or inf; NF4 needs finite values (check the weight)")
    common = dict(shape=tuple(weight.shape), dtype=weight.dtype, block_size=block_size)
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, **common)
    codes, nested, offset = _quantize_absmax(absmax, double_block_size)
    return NF4Weight(packed=packed, absmax=codes, **common, nested_absmax=nested,
                     offset=offset, double_block_size=double_block_size)


def _check_quantize_args(weight: Tensor, block_size: int, double_block_size: int,
                         chunk_elements: int) -> None:
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quantize_nf4 takes float32/float16/bfloat16 weights, got "
                         f"{weight.dtype}; convert it first, e.g. weight.float()")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4 got an empty weight; there is nothing to quantize")
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number (64 in QLoRA), "
                         f"got {block_size}")
    if double_block_size <= 0:
        raise ValueError(f"double_block_size must be positive (256 in QLoRA), "
                         f"got {double_block_size}")
    if chunk_elements <= 0:
        raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")


def _quantize_full_blocks(flat: Tensor, b0: int, b1: int, block_size: int, work: _Scratch,
                          packed: Tensor, absmax: Tensor) -> None:
    """Quantize blocks b0..b1 (all full) into packed[b0*bs/2 : b1*bs/2] and absmax[b0:b1]."""
    x = flat[b0 * block_size: b1 * block_size].view(b1 - b0, block_size)  # (nb, bs)
    scaled = work.scaled.view(b1 - b0, block_size)  # (nb, bs)
    if x.dtype != torch.float32:
        x = work.inner.view(b1 - b0, block_size).copy_(x)  # fp32 copy into spare scratch
    amax = torch.abs(x, out=scaled).amax(dim=1)  # (nb,); scaled is overwritten below
    absmax[b0:b1] = amax
    # Multiply by the fp32 reciprocal rather than divide: bitsandbytes rounds this way for
    # full blocks, and the codes must match bit for bit.
    torch.mul(x, (1.0 / amax.clamp(min=_TINY))[:, None], out=scaled)
    half = block_size // 2
    _pack_nibbles(_nf4_codes(work), packed[b0 * half: b1 * half])


def _quantize_last_block(flat: Tensor, start: int, packed: Tensor, absmax: Tensor) -> None:
    """Quantize the short last block flat[start:] (fewer than block_size elements)."""
    x = flat[start:].float()  # (r,)
    # Two quirks of bitsandbytes kept for byte compatibility: the short block stores its
    # absmax clamped to _TINY (full blocks store 0 when all zero), and it divides by it
    # (full blocks multiply by a reciprocal, which can round differently).
    amax = x.abs().max().clamp(min=_TINY)
    absmax[-1] = amax
    scaled = x / amax
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])  # padding nibble: code of 0.0
    work = _Scratch.allocate(scaled.numel(), scaled.device)
    work.scaled.copy_(scaled)
    _pack_nibbles(_nf4_codes(work), packed[start // 2:])


# --- double quantization -----------------------------------------------------------------

# Note: Nested absmax rounding
# bitsandbytes' CPU kernel for 8-bit blockwise quantization (0.50) does not search the
# dynamic map for the nearest value. It rounds the normalised value v in [-1, 1] onto a
# grid of 65,536 points, g = trunc(fma((v + 1) / 2, 65535, 0.5)), and takes the map entry
# nearest to the grid point -1 + 2g/65535 (ties to the lower entry). Near zero the map is
# finer than the grid (steps of 5e-7 against 3e-5), so this differs from the true nearest
# entry there, and v = 0 maps to +2.1e-5. A group whose values all equal the offset has
# scale 0 and codes 0. We reproduce all of it to be byte-compatible; the decoding rule is
# the same either way, and the extra error over the nearest entry is at most one grid step
# (2/65535 = 3.1e-5) times the group scale.
_GRID = 65536


@functools.lru_cache(maxsize=8)
def _dynamic_grid_table(device: torch.device) -> tuple[Tensor, Tensor]:
    """(signed dynamic map, fp32 (256,); map index of each grid point, uint8 (65536,))."""
    dyn = signed_dynamic_map()
    mids = (dyn[:-1] + dyn[1:]) * 0.5  # (255,) in fp32, as the reference kernel
    grid = (torch.arange(_GRID, dtype=torch.float32) * 2) / (_GRID - 1) - 1.0  # (65536,)
    index = torch.searchsorted(mids, grid)  # midpoints strictly below each grid point
    return dyn.to(device), index.to(torch.uint8).to(device)


def _quantize_absmax(absmax: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Double quantization: (uint8 codes (nb,), fp32 group scales (ng,), fp32 offset ()).

    a_b - o is quantized per group of ``group`` blocks against the signed dynamic map;
    see Note: Nested absmax rounding for the exact rounding rule.
    """
    offset = absmax.mean()  # fp32 mean, the same reduction as the reference
    centered = absmax - offset  # (nb,)
    nb = centered.numel()
    ng = -(-nb // group)
    padded = torch.nn.functional.pad(centered, (0, ng * group - nb))  # (ng * group,)
    scales = padded.view(ng, group).abs().amax(dim=1)  # (ng,); zero padding cannot win
    v = padded.view(ng, group) * (1.0 / scales)[:, None]  # (ng, group); inf/nan if scale 0
    half = (v.clamp(-1.0, 1.0) + 1.0) * 0.5
    # One fp32 rounding of half*65535 + 0.5, as a fused multiply-add does: the float64
    # product and sum are exact (24 + 16 bits), .float() rounds once.
    fused = (half.double() * (_GRID - 1) + 0.5).float()
    dyn, grid_index = _dynamic_grid_table(absmax.device)
    codes = grid_index[fused.nan_to_num_(0.0).long()]  # (ng, group) uint8
    codes[scales == 0] = 0
    return codes.view(-1)[:nb].clone(), scales, offset


def _absmax_fp32(q: NF4Weight) -> Tensor:
    """The fp32 block scales (n_blocks,): stored, or decoded as DYN[e_b] * s_g + o."""
    if not q.double_quant:
        return q.absmax
    dyn, _ = _dynamic_grid_table(q.absmax.device)
    nb, group = q.absmax.numel(), q.double_block_size
    decoded = torch.index_select(dyn, 0, q.absmax.int())  # (nb,) DYN[e_b]
    full = nb - nb % group  # blocks in complete groups
    decoded[:full].view(-1, group).mul_(q.nested_absmax[: full // group, None])
    decoded[full:].mul_(q.nested_absmax[-1])  # the short last group, if any
    return decoded.add_(q.offset)  # product then sum, no fused rounding


# --- dequantize --------------------------------------------------------------------------

# Note: Dequantize by byte-pair gather
# Each packed byte j holds two codes, so it decodes to the fp32 pair (NF4[j >> 4], NF4[j & 15]):
# a 256-entry table of pairs, each read as one int64, turns a chunk into one gather of 8-byte
# items (0x3C -> the bits of (NF4[3], NF4[12])), then one multiply by the block's absmax. We
# gather with torch.gather on the chunk's bytes viewed as a few long rows, the table broadcast
# to every row: its CPU kernel splits the rows over all threads, where a 1-D index_select runs
# on one thread. The pairs land in the output itself (viewed as int64) and are scaled in place
# while they are still in cache. For a large result, writing it is itself a large cost: each
# first write to a 4 KB page of a fresh tensor faults the page in (the kernel zeroes it); for
# a 4096x4096 fp32 weight that costs more than the decoding on the 2-core development machine.
# Writing first with a parallel op spreads the faults over the threads, and `out=` (a buffer
# reused across calls, say one per layer shape) avoids them altogether.


_GATHER_ROWS = 64  # rows of the gather's index view: work units enough for 2-16 threads


@functools.lru_cache(maxsize=8)
def _byte_pair_table(device: torch.device) -> Tensor:
    """int64 (256,): byte j -> the fp32 pair (NF4[j >> 4], NF4[j & 15]) reinterpreted as 8 bytes.

    Decoding one byte is then a single 8-byte gather that writes two floats in order.
    """
    code = nf4_codebook()
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1)  # (256, 2)
    return pairs.contiguous().view(torch.int64).view(-1).to(device)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None, *, out: Tensor | None = None,
                   chunk_elements: int = DEFAULT_DEQUANT_CHUNK_ELEMENTS) -> Tensor:
    """W_i = NF4[c_i] * a_b, computed in fp32 and cast to ``dtype``; shape ``q.shape``.

    Equals ``bitsandbytes.functional.dequantize_4bit`` on the same bytes. ``dtype`` defaults
    to ``out``'s dtype, else fp32. ``out``: a contiguous tensor of shape ``q.shape`` on the
    bytes' device to write into and return (reusing one skips allocating a fresh result; see
    Note: Dequantize by byte-pair gather). Works in chunks of ``chunk_elements``, which bounds
    the scratch memory and does not change the result (see Note: Quantize in chunks).
    """
    if chunk_elements <= 0:
        raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
    out = _dequantize_output(q, dtype, out)
    flat = out.view(-1)  # (n,)
    n, bs = q.numel, q.block_size
    absmax = _absmax_fp32(q)  # (n_blocks,)
    n_full = n // bs
    step = max(1, chunk_elements // bs)  # whole blocks per chunk
    if n_full:
        work = _DequantScratch.allocate(min(step, n_full), bs, flat)
        for b0 in range(0, n_full, step):
            b1 = min(b0 + step, n_full)
            _dequantize_full_blocks(q.packed, absmax, b0, b1, work, flat[b0 * bs: b1 * bs])
    if n_full * bs < n:
        flat[n_full * bs:] = _dequantize_last_block(q.packed, absmax[-1], n_full * bs, n)
    return out


def _dequantize_output(q: NF4Weight, dtype: torch.dtype | None, out: Tensor | None) -> Tensor:
    """``out`` checked against ``q`` and ``dtype``, or a fresh (q.shape) tensor."""
    device = q.packed.device
    if out is not None and dtype is not None and out.dtype != dtype:
        raise ValueError(f"dequantize_nf4 got dtype={dtype} but out is {out.dtype}; pass one "
                         f"of them, or make them agree")
    dtype = dtype or (torch.float32 if out is None else out.dtype)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dequantize_nf4 writes float32/float16/bfloat16, got {dtype}")
    if out is None:
        return torch.empty(q.shape, dtype=dtype, device=device)
    if tuple(out.shape) != q.shape or out.device != device:
        raise ValueError(f"out has shape {tuple(out.shape)} on {out.device}, but the weight "
                         f"has shape {q.shape} on {device}; allocate out to match")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous (it is written through flat views); "
                         "allocate it with torch.empty(q.shape)")
    return out


@dataclass(frozen=True)
class _DequantScratch:
    """Chunk-sized work tensors for decoding, reused across chunks."""

    index: Tensor  # int64 (nb, bs/2): the packed bytes, widened for the gather
    pairs: Tensor | None  # int64 (nb, bs/2): decoded pairs, unless written into the output

    @staticmethod
    def allocate(nb: int, bs: int, out: Tensor) -> _DequantScratch:
        def empty() -> Tensor:
            return torch.empty(nb, bs // 2, dtype=torch.int64, device=out.device)

        # The gather writes fp32 pairs straight into an fp32 output when it can be viewed as
        # int64 (an even storage offset); otherwise into scratch, then multiplies across.
        direct = out.dtype == torch.float32 and out.storage_offset() % 2 == 0
        return _DequantScratch(empty(), None if direct else empty())


def _dequantize_full_blocks(packed: Tensor, absmax: Tensor, b0: int, b1: int,
                            work: _DequantScratch, out: Tensor) -> None:
    """Decode blocks b0..b1 (all full) into ``out`` ((b1 - b0) * bs,) of any float dtype."""
    nb, half = b1 - b0, work.index.shape[1]
    index = work.index[:nb].copy_(packed[b0 * half: b1 * half].view(nb, half))  # (nb, bs/2)
    direct = work.pairs is None
    pairs = out.view(torch.int64).view(nb, half) if direct else work.pairs[:nb]  # (nb, bs/2)
    # The threads split the gather by rows; a few long rows cost less per byte than nb short
    # ones. Every row reads the same table.
    rows = math.gcd(nb * half, _GATHER_ROWS)
    table = _byte_pair_table(packed.device).expand(rows, 256)
    torch.gather(table, 1, index.view(rows, -1), out=pairs.view(rows, -1))
    values = pairs.view(torch.float32).view(nb, -1)  # (nb, bs)
    if direct:
        values.mul_(absmax[b0:b1, None])
    else:  # fp32 product, then one rounding to the output dtype
        torch.mul(values, absmax[b0:b1, None], out=out.view(nb, -1))


def _dequantize_last_block(packed: Tensor, amax: Tensor, start: int, n: int) -> Tensor:
    """Decode the short last block, elements start..n, as fp32."""
    byte = packed[start // 2:].long()  # (ceil((n - start) / 2),)
    codes = torch.stack([byte >> 4, byte & 15], dim=1).view(-1)[: n - start]
    return nf4_codebook(packed.device)[codes] * amax


# --- storage -----------------------------------------------------------------------------


def _held_tensors(q: NF4Weight) -> dict[str, Tensor]:
    tensors = {"packed": q.packed, "absmax": q.absmax}
    if q.double_quant:
        tensors |= {"nested_absmax": q.nested_absmax, "offset": q.offset}
    return tensors


def nf4_storage_bits(q: NF4Weight) -> float:
    """Bits per parameter, measured from the bytes of the tensors ``q`` holds."""
    n_bytes = sum(t.numel() * t.element_size() for t in _held_tensors(q).values())
    return 8.0 * n_bytes / q.numel


def to_state_dict(q: NF4Weight, prefix: str = "") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Plain named tensors (safetensors-ready) and string metadata describing ``q``.

    Tensors: ``{prefix}packed``, ``{prefix}absmax`` and, when double quantized,
    ``{prefix}nested_absmax`` and ``{prefix}offset`` (0-dim). Metadata values are strings,
    as safetensors requires: shape (JSON list), dtype, block sizes.
    """
    tensors = {prefix + name: t for name, t in _held_tensors(q).items()}
    metadata = {
        prefix + "shape": json.dumps(list(q.shape)),
        prefix + "dtype": str(q.dtype).removeprefix("torch."),
        prefix + "block_size": str(q.block_size),
        prefix + "double_block_size": str(q.double_block_size),
        prefix + "quant_type": "nf4",
    }
    return tensors, metadata


def from_state_dict(tensors: dict[str, Tensor], metadata: dict[str, str],
                    prefix: str = "") -> NF4Weight:
    """Rebuild an NF4Weight written by :func:`to_state_dict` (with the same ``prefix``)."""
    if metadata.get(prefix + "quant_type") != "nf4":
        raise ValueError(f"metadata for {prefix!r} does not describe an NF4 weight "
                         f"(quant_type={metadata.get(prefix + 'quant_type')!r})")
    dtype = getattr(torch, metadata[prefix + "dtype"])
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"unsupported NF4 weight dtype {metadata[prefix + 'dtype']!r}")
    nested = prefix + "nested_absmax"
    return NF4Weight(
        packed=tensors[prefix + "packed"],
        absmax=tensors[prefix + "absmax"],
        shape=tuple(json.loads(metadata[prefix + "shape"])),
        dtype=dtype,
        block_size=int(metadata[prefix + "block_size"]),
        nested_absmax=tensors.get(nested),
        offset=tensors[prefix + "offset"] if nested in tensors else None,
        double_block_size=int(metadata[prefix + "double_block_size"]),
    )

"""Blockwise 8-bit quantization of optimizer state (Dettmers et al. 2022, arXiv:2110.02861).

A state tensor x is flattened and cut into blocks of ``block_size`` elements:

    a_b = max |x_i| over block b                        (the block's absmax, fp32)
    c_i = index of the map value nearest to x_i / a_b   (uint8; ties take the lower index)
    x_i ~= MAP[c_i] * a_b

MAP is a sorted 256-value dynamic map: the signed one (`signed_dynamic_map`) for Adam's first
moment, the unsigned one (`unsigned_dynamic_map`) for the second moment, which is never
negative and so spends all 8 bits on magnitudes. A dynamic map is dense near 0 and coarse near
±1; its widest gap is in the top decade [0.1, 1]: 0.9/64 for the signed map, 0.9/128 for the
unsigned one, so nearest rounding errs by at most

    |x_i − MAP[c_i]·a_b| <= a_b · gap / 2 = a_b · 0.00703 (signed), a_b · 0.00352 (unsigned).

Blocks keep one outlier from flattening the resolution of the whole tensor: each block is
scaled by its own maximum. Storage: 8 + 32/block_size bits per element (8.125 for 256).
Everything is vectorised over blocks; a short last block is padded with zeros, which cannot
change its absmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from splice.quant.nf4 import signed_dynamic_map

__all__ = ["QuantMap", "dequantize_blockwise", "quantize_blockwise", "signed_dynamic_map",
           "unsigned_dynamic_map"]

_TINY = 1e-38  # an all-zero block divides by this instead of 0: its values stay 0


def unsigned_dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """The unsigned 8-bit dynamic map (Dettmers 2015, arXiv:1511.04561), 256 sorted values in [0, 1].

    Built like the signed map, with the sign bit spent on a finer fraction: level i = 0..6 holds
    2^(i+1) magnitudes, the midpoints of 2^(i+1) equal steps of [0.1, 1], times 10^(i-6). That
    is 2 + 4 + ... + 128 = 254 values; 0 and 1 complete the 256. Level 0 gives the smallest
    non-zero value, 0.325e-6; level 6 the largest below 1, 0.9965. All arithmetic in fp32.
    """
    values = [torch.zeros(1), torch.ones(1)]
    for level in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (level + 1) + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0  # (2^(level+1),)
        values.append((10 ** (level - 6)) * mids)
    return torch.cat(values).sort().values.to(device)


# Note: Nearest map value by bit pattern
# The code of a scaled value v in [-1, 1] is the number of midpoints between neighbouring map
# values that lie strictly below v (torch.bucketize's count; v exactly on a midpoint takes the
# lower code). A binary search per element costs ~80 ns on this CPU, most of an 8-bit
# optimizer step. Instead a table is indexed by the top 16 bits of v's fp32 pattern (sign,
# exponent, 7 mantissa bits). Each such cell is an interval of reals narrower than the map's
# gaps there (a cell in [2^e, 2^(e+1)) is 2^(e-7) wide: 0.0039 just below 1, where the
# unsigned map's values are 0.007 apart), so it holds at most one midpoint m, which
# `QuantMap.from_values` checks, and
#     code(v) = (midpoints below the cell) + (v > m)
# is exact: two table reads and one compare (m = +inf in a cell without a midpoint).
# Example, unsigned map: v = 0.5 has bits 0x3F000000, cell 0x3F00 = [0.5, 0.50390625) holds
# the midpoint 0.50078 between MAP[183] = 0.49727 and MAP[184] = 0.50430; 183 midpoints lie
# below the cell, so v = 0.5 gets code 183 + 0 and v = 0.502 code 183 + 1.


@dataclass(frozen=True)
class QuantMap:
    """A sorted 256-value map and its lookup tables (see Note: Nearest map value by bit pattern).

    values: fp32 (256,), the map.
    below:  uint8 (65536,), per 16-bit cell: the midpoints below the cell.
    inner:  fp32 (65536,), per cell: the midpoint inside it, or +inf.
    """

    values: Tensor
    below: Tensor
    inner: Tensor

    @staticmethod
    def from_values(values: Tensor, device: torch.device | str | None = None) -> QuantMap:
        values = values.float().cpu()
        if values.shape != (256,) or not bool((values[1:] > values[:-1]).all()):
            raise ValueError("a QuantMap needs 256 strictly increasing values")
        mids = (values[:-1] + values[1:]) / 2  # (255,)
        cells = torch.arange(1 << 16, dtype=torch.int64)
        first = _as_float32(cells << 16)  # lowest bit pattern of each cell
        last = _as_float32((cells << 16) | 0xFFFF)
        lo, hi = torch.minimum(first, last), torch.maximum(first, last)  # negatives run backwards
        below = torch.bucketize(lo, mids)  # midpoints < lo
        inside = torch.bucketize(hi, mids, right=True) - below  # midpoints in [lo, hi]
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        if int(inside[finite].max()) > 1:
            raise ValueError("a 16-bit lookup cell holds two midpoints of this map; its values "
                             "are closer than the table resolves")
        inner = torch.cat([mids, torch.tensor([float("inf")])])[below]  # (65536,)
        inner = torch.where(inside > 0, inner, torch.tensor(float("inf")))
        return QuantMap(values.to(device), below.to(torch.uint8).to(device), inner.to(device))

    def codes(self, scaled: Tensor) -> Tensor:
        """uint8 index of the nearest map value for each fp32 element (equals bucketize)."""
        cell = torch.bitwise_right_shift(scaled.view(torch.int32), 16).bitwise_and_(0xFFFF)
        codes = torch.index_select(self.below, 0, cell.view(-1)).view(scaled.shape)
        above = scaled > torch.index_select(self.inner, 0, cell.view(-1)).view(scaled.shape)
        return codes.add_(above)


def _as_float32(bits: Tensor) -> Tensor:
    """fp32 values of unsigned 32-bit patterns held in int64."""
    signed = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)
    return signed.to(torch.int32).view(torch.float32)


def quantize_blockwise(x: Tensor, qmap: QuantMap, block_size: int, *,
                       out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """(codes, absmax) of the flattened ``x``: uint8 (n,) indices into ``qmap.values`` and fp32
    block maxima (ceil(n / block_size),).

    With ``out=(codes, absmax)`` the results are written into those tensors (e.g. slices of an
    optimizer's state) and returned.
    """
    flat = x.reshape(-1).float()  # (n,)
    n = flat.numel()
    blocks = _as_blocks(flat, block_size)  # (nb, bs)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    # Divide rather than multiply by a reciprocal: x_i / a_b is then never above 1 in size.
    scaled = blocks / absmax.clamp(min=_TINY)[:, None]  # (nb, bs) in [-1, 1]
    codes = qmap.codes(scaled).view(-1)[:n]  # (n,)
    if out is None:
        return codes, absmax
    out[0].copy_(codes)
    out[1].copy_(absmax)
    return out


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: QuantMap, block_size: int) -> Tensor:
    """x_i = MAP[c_i] · a_b as fp32, flat (n,): the inverse of `quantize_blockwise`."""
    flat = codes.reshape(-1)
    n = flat.numel()
    values = torch.index_select(qmap.values, 0, flat.int())  # (n,)
    n_full = n // block_size
    values[: n_full * block_size].view(n_full, block_size).mul_(absmax[:n_full, None])
    if n_full * block_size < n:
        values[n_full * block_size:].mul_(absmax[n_full])
    return values


def _as_blocks(flat: Tensor, block_size: int) -> Tensor:
    """(nb, block_size) blocks of ``flat``: a view, or a copy zero-padded to whole blocks."""
    if block_size <= 0:
        raise ValueError(f"block_size must be a positive integer (e.g. 256), got {block_size}")
    pad = -flat.numel() % block_size
    if pad:
        flat = F.pad(flat, (0, pad))  # [a, b, c] with block_size 2 -> [[a, b], [c, 0]]
    return flat.view(-1, block_size)

"""AdamW8bit: AdamW with both moments stored blockwise-quantized in 8 bits.

8-bit optimizers (Dettmers et al. 2022, arXiv:2110.02861) keep Adam's m and v as one byte per
element plus one fp32 scale per block (see splice.optim.blockwise): 2 bytes per parameter
(+ 8/block_size for the scales) instead of AdamW's 8. Each step, per parameter:

    m, v ← decode(codes, absmax)                      fp32, one chunk of blocks at a time
    AdamW update of θ, m, v in fp32                    (`adamw_update_`, torch's arithmetic)
    codes, absmax ← encode(m), encode(v)               m on the signed map, v on the unsigned

The update reads the fp32 m and v before they are re-quantized, so the quantization error
enters the next step's state, not this step's update: the first step equals AdamW's exactly.
Tensors with fewer than ``min_8bit_size`` elements (biases, norms, small adapters) keep fp32
state, where 8 bits would save little and cost precision.

# Note: Chunked 8-bit update
A parameter's state is decoded, updated and re-encoded in chunks of whole blocks (2^20
elements by default), so the fp32 working copies of m and v (4 MB each, plus a few temporaries
of the same length) do not grow with the parameter: an 8-bit state that decoded whole would
briefly cost 4x its own size for the largest weight. Blocks are quantized independently and the update is elementwise, so the
chunk size does not change the result.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from splice.optim.blockwise import (QuantMap, dequantize_blockwise, quantize_blockwise,
                                    signed_dynamic_map, unsigned_dynamic_map)
from splice.optim.state_io import check_state_shape, load_state_dict_placed
from splice.optim.update import AdamWFamily, AdamWHyper, OptimizerError, adamw_update_

DEFAULT_CHUNK_ELEMENTS = 1 << 20
QUANTIZED = ("exp_avg", "exp_avg_sq")  # each stored as <name>_codes (uint8) + <name>_absmax (fp32)


@functools.lru_cache(maxsize=8)
def _maps(device: torch.device) -> dict[str, QuantMap]:
    """The map of each moment: signed for m, unsigned for v (never negative)."""
    return {"exp_avg": QuantMap.from_values(signed_dynamic_map(), device),
            "exp_avg_sq": QuantMap.from_values(unsigned_dynamic_map(), device)}


class AdamW8bit(AdamWFamily):
    """AdamW (decoupled weight decay) with m and v blockwise-quantized to 8 bits.

    θ ← θ(1 − lr·λ); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
    θ ← θ − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε),  then m, v ← Q₈(m), Q₈(v)

    block_size:     elements per quantization block (one fp32 absmax each).
    min_8bit_size:  parameters with fewer elements keep fp32 m and v.
    chunk_elements: elements decoded at a time (see Note: Chunked 8-bit update).

    State per 8-bit parameter, on the parameter's device: step (fp32 scalar, host),
    exp_avg_codes / exp_avg_sq_codes (uint8, numel), exp_avg_absmax / exp_avg_sq_absmax
    (fp32, ceil(numel / block_size)). Per small parameter: step, exp_avg, exp_avg_sq (fp32).
    Parameters in fp16/bf16 are updated through an fp32 copy.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, block_size: int = 256,
                 min_8bit_size: int = 4096,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        _check_sizes(block_size, min_8bit_size, chunk_elements)
        self.block_size = block_size
        self.min_8bit_size = min_8bit_size
        self.chunk_elements = max(1, chunk_elements // block_size) * block_size  # whole blocks
        super().__init__(params, lr, betas, eps, weight_decay)

    def _check_param(self, param: Tensor) -> None:
        if torch.is_complex(param):
            raise OptimizerError("AdamW8bit does not quantize complex parameters; "
                                 "use PagedAdamW or torch.optim.AdamW for them")

    def is_8bit(self, param: Tensor) -> bool:
        """Whether ``param``'s moments are (or will be) stored in 8 bits."""
        return param.numel() >= self.min_8bit_size

    def _update(self, param: Tensor, hyper: AdamWHyper) -> None:
        state = self.state[param]
        if not state:
            state.update(self._initial_state(param))
        state["step"] += 1
        step = float(state["step"])
        if "exp_avg" in state:  # small parameter: fp32 state
            with _fp32(param) as p32:
                adamw_update_(p32, param.grad.float(), state["exp_avg"], state["exp_avg_sq"],
                              step, hyper)
            return
        with _fp32(param) as p32:
            flat, grad = p32.view(-1), param.grad.reshape(-1)  # (n,)
            for start in range(0, flat.numel(), self.chunk_elements):
                stop = min(start + self.chunk_elements, flat.numel())
                self._update_chunk(flat[start:stop], grad[start:stop].float(), state,
                                   start, step, hyper)

    def _update_chunk(self, param: Tensor, grad: Tensor, state: dict[str, Any], start: int,
                      step: float, hyper: AdamWHyper) -> None:
        """Decode, update and re-encode the state of elements start..start+len(param)."""
        bs = self.block_size
        elements = slice(start, start + param.numel())
        blocks = slice(start // bs, -(-elements.stop // bs))
        maps = _maps(param.device)
        moments = {name: dequantize_blockwise(state[f"{name}_codes"][elements],
                                              state[f"{name}_absmax"][blocks], maps[name], bs)
                   for name in QUANTIZED}  # fp32 (chunk,) each
        adamw_update_(param, grad, moments["exp_avg"], moments["exp_avg_sq"], step, hyper)
        for name in QUANTIZED:
            quantize_blockwise(moments[name], maps[name], bs,
                               out=(state[f"{name}_codes"][elements],
                                    state[f"{name}_absmax"][blocks]))

    def _initial_state(self, param: Tensor) -> dict[str, Tensor]:
        """Zero moments: fp32 tensors, or the codes of 0.0 with zero absmax."""
        state: dict[str, Tensor] = {"step": torch.tensor(0.0, dtype=torch.float32)}
        if not self.is_8bit(param):
            return state | {name: torch.zeros(param.shape, dtype=torch.float32,
                                              device=param.device) for name in QUANTIZED}
        n, maps = param.numel(), _maps(param.device)
        for name in QUANTIZED:
            zero = int(torch.argmin(maps[name].values.abs()))  # the map's exact 0.0
            state[f"{name}_codes"] = torch.full((n,), zero, dtype=torch.uint8, device=param.device)
            state[f"{name}_absmax"] = torch.zeros(-(-n // self.block_size), device=param.device)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by AdamW8bit with the same block_size and min_8bit_size."""
        load_state_dict_placed(self, state_dict, self._place)

    def _place(self, param: Tensor, name: str, value: Any) -> Any:
        """A saved state value as this optimizer keeps it: dtypes kept, on the param's device."""
        if name == "step":
            return torch.tensor(float(value), dtype=torch.float32)
        if not isinstance(value, Tensor):
            return value
        n, expected = param.numel(), self._expected_state(param)
        if name not in expected:
            raise ValueError(f"optimizer state {name!r} does not belong to an AdamW8bit "
                             f"parameter of {n} elements with min_8bit_size={self.min_8bit_size}"
                             f" (it expects {', '.join(expected)}); load a state dict saved "
                             "with the same min_8bit_size")
        dtype, shape = expected[name]
        check_state_shape(param, name, value, shape)
        if dtype == torch.uint8 and value.dtype != torch.uint8:
            raise ValueError(f"optimizer state {name!r} has dtype {value.dtype}; 8-bit codes "
                             "must stay uint8 (save the state dict without casting it)")
        return value.to(device=param.device, dtype=dtype, copy=True)

    def _expected_state(self, param: Tensor) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        if not self.is_8bit(param):
            return {name: (torch.float32, tuple(param.shape)) for name in QUANTIZED}
        n, blocks = param.numel(), -(-param.numel() // self.block_size)
        expected = {}
        for name in QUANTIZED:
            expected[f"{name}_codes"] = (torch.uint8, (n,))
            expected[f"{name}_absmax"] = (torch.float32, (blocks,))
        return expected


class _fp32:
    """``with _fp32(param) as p32``: p32 is param itself if fp32 and contiguous, else a working
    fp32 copy that is written back on exit (the update of a bf16 weight runs in fp32)."""

    def __init__(self, param: Tensor) -> None:
        self.param = param
        direct = param.dtype == torch.float32 and param.is_contiguous()
        self.work = param if direct else param.float().contiguous()

    def __enter__(self) -> Tensor:
        return self.work

    def __exit__(self, *exc: object) -> None:
        if self.work is not self.param:
            self.param.copy_(self.work)


def _check_sizes(block_size: int, min_8bit_size: int, chunk_elements: int) -> None:
    if not (isinstance(block_size, int) and block_size > 0):
        raise OptimizerError(f"block_size={block_size!r}: give a positive integer (256 is usual)")
    if not (isinstance(min_8bit_size, int) and min_8bit_size >= 0):
        raise OptimizerError(f"min_8bit_size={min_8bit_size!r}: give an integer >= 0 (0 "
                             "quantizes every parameter; 4096 keeps small ones in fp32)")
    if not (isinstance(chunk_elements, int) and chunk_elements > 0):
        raise OptimizerError(f"chunk_elements={chunk_elements!r}: give a positive integer")

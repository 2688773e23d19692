"""Where a quantized layer gets the dense weight for its matmul: one seam per device type.

`Linear4bit` calls `nf4_matmul_weight` and nothing else, so a faster device path (a fused
dequantize-matmul kernel on a GPU) plugs in here by registering a backend for its device type,
without touching the layer or the adapters on top. The default backend is `dequantize_nf4`:
pure tensor ops that run on any device torch supports, the CPU included, and that the tests
check against bitsandbytes byte for byte. No fused GPU kernel ships yet: it needs a GPU to be
written against and tested, and none was available to this build.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from splice.quant.nf4 import NF4Weight, dequantize_nf4

WeightBackend = Callable[[NF4Weight, torch.dtype], Tensor]

_BACKENDS: dict[str, WeightBackend] = {}


def register_weight_backend(device_type: str, backend: WeightBackend) -> None:
    """Use `backend(quant, dtype) -> (out, in) tensor` for NF4 weights on `device_type`."""
    _BACKENDS[device_type] = backend


def nf4_matmul_weight(quant: NF4Weight, dtype: torch.dtype) -> Tensor:
    """The dense weight an NF4 layer multiplies by, in `dtype`, on the bytes' device."""
    backend = _BACKENDS.get(quant.packed.device.type, _dequantize)
    return backend(quant, dtype)


def _dequantize(quant: NF4Weight, dtype: torch.dtype) -> Tensor:
    return dequantize_nf4(quant, dtype)

"""Where a quantized layer gets the dense weight for its matmul: one seam per device type.

`Linear4bit` calls `nf4_matmul_weight` and nothing else, so a faster device path (a fused
dequantize-matmul kernel on a GPU) plugs in here by registering a backend for its device type,
without touching the layer or the adapters on top. The default backend is `dequantize_nf4`:
pure tensor ops that run on any device torch supports, the CPU included, and that the tests
check against bitsandbytes byte for byte. No fused GPU kernel ships yet: it needs a GPU to be
written against and tested, and none was available to this build.
"""

from __future__ import annotations

import threading
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
    """The dense weight an NF4 layer multiplies by, in `dtype`, on the bytes' device.

    The result is only valid until the next call on this thread (see Note: One scratch weight
    per shape): multiply by it at once, never keep it. `Linear4bit.dequantize` returns a tensor
    of its own."""
    backend = _BACKENDS.get(quant.packed.device.type, _dequantize_into_scratch)
    return backend(quant, dtype)


# Note: One scratch weight per shape
# A 4-bit layer needs its dense weight for one matmul, forward and again in backward, and drops
# it. A fresh tensor each time is a fresh mmap on CPU whose pages are faulted in and zeroed
# again: for large weights that costs more than decoding them (bench/nf4_throughput.py, the
# "out=" rows). So the decoder writes into one buffer per (shape, dtype, device), kept per
# thread (autograd or a server may run layers on several threads). The memory held is one
# weight of each distinct shape, a few per model.
_scratch = threading.local()


def _dequantize_into_scratch(quant: NF4Weight, dtype: torch.dtype) -> Tensor:
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (tuple(quant.shape), dtype, quant.packed.device)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = torch.empty(quant.shape, dtype=dtype, device=quant.packed.device)
    return dequantize_nf4(quant, dtype, out=buffer)

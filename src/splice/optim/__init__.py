"""Optimizers whose state costs less device memory: paged to the host, or stored in 8 bits.

    optimizer = make_optimizer("adamw8bit", model.parameters(), lr=2e-4, weight_decay=0.0)

Both run torch.optim.AdamW's arithmetic (splice.optim.update); PagedAdamW matches it bit for
bit. Knows nothing about adapters: torch, splice.quant and splice.core.errors only.
"""

from splice.optim.adamw8bit import AdamW8bit
from splice.optim.blockwise import (QuantMap, dequantize_blockwise, quantize_blockwise,
                                    signed_dynamic_map, unsigned_dynamic_map)
from splice.optim.factory import OPTIMIZER_NAMES, make_optimizer
from splice.optim.paged import PagedAdamW
from splice.optim.state_io import optimizer_state_bytes
from splice.optim.update import OptimizerError

__all__ = [
    "OPTIMIZER_NAMES", "AdamW8bit", "OptimizerError", "PagedAdamW", "QuantMap",
    "dequantize_blockwise",
    "make_optimizer", "optimizer_state_bytes", "quantize_blockwise", "signed_dynamic_map",
    "unsigned_dynamic_map",
]

"""LoRA initialisations: where A and B start, and what the base weight becomes.

Each init lives in its own module and registers an `InitSpec` here by name (the names of
`splice.config.lora.LORA_INITS`). A data-free init maps one weight to a `LowRankInit`; a
data-aware one first gathers statistics from a few training batches (`collect`) and maps each
weight and its statistics to a `LowRankInit`. `methods/lora.py` runs data-free inits as it
creates an adapter; `splice.inits.data.attach_with_data` runs the data-aware ones.

    weight W: (out, in) fp32  ->  A: (r, in), B: (out, r), base: (out, in) or None (unchanged)

Unless `base` is None, the adapted model at step 0 is base + s·B·A; an init that keeps the model
unchanged returns base = W - s·B·A (`residual`).
"""

from __future__ import annotations

from splice.inits import eva, loftq, lora_ga, olora, pissa  # noqa: F401  (each registers itself)
from splice.inits.registry import INITS, InitSpec, LowRankInit, get_init, register_init, residual_of

__all__ = ["INITS", "InitSpec", "LowRankInit", "get_init", "register_init", "residual_of"]

"""Weight quantization for QLoRA-style frozen bases. A leaf package: torch only, no adapters."""

from splice.quant import nf4
from splice.quant.nf4 import *  # noqa: F401,F403  (the public names listed in nf4.__all__)

__all__ = list(nf4.__all__)

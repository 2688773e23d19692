"""Weight quantization for QLoRA-style frozen bases: NF4 math (`nf4`), the frozen 4-bit layer
(`linear4bit`), model surgery (`surgery`), the device seam (`kernels`) and the on-disk folder
(`folder`). Torch and safetensors only: nothing here knows about adapters."""

from splice.quant import nf4
from splice.quant.folder import is_quantized_folder, load_quantized, save_quantized
from splice.quant.kernels import nf4_matmul_weight, register_weight_backend
from splice.quant.linear4bit import Linear4bit
from splice.quant.nf4 import *  # noqa: F401,F403  (the public names listed in nf4.__all__)
from splice.quant.surgery import (QuantizationReport, dequantize_model, quantize_model,
                                  quantized_layers)

__all__ = list(nf4.__all__) + [
    "Linear4bit", "QuantizationReport", "dequantize_model", "is_quantized_folder",
    "load_quantized", "nf4_matmul_weight", "quantize_model", "quantized_layers",
    "register_weight_backend", "save_quantized"]

"""Export a base model with an adapter folded in, as a standalone model folder.

For an adapter trained on a 4-bit base (QLoRA), the base it learned against is deq(NF4(W₀)), not
W₀: the export rebuilds that base (quantizing W₀ again reproduces the training bytes exactly),
dequantizes it, adds s·BA in fp32 and writes a 16-bit model (bf16 by default). `requantize=True`
writes the merged weights back in NF4 instead, which loses information: the report gives the
error that adds on top of the 16-bit merge.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splice.core.io import load_adapter
from splice.core.merging import merge_and_unload
from splice.models import load_model
from splice.quant.nf4 import dequantize_nf4, quantize_nf4
from splice.quant.folder import save_quantized, write_folder_atomically
from splice.quant.surgery import dequantize_model, quantizable_linears, quantize_model, quantized_layers


@dataclass(frozen=True)
class MergeReport:
    output: Path
    dtype: str                          # what the weights were written in
    base_quantization: dict | None      # the 4-bit base the adapter was trained on, if any
    requantize_error: float | None = None   # ‖deq(NF4(W')) − W'‖ / ‖W'‖ over the merged linears
    bf16_error: float | None = None         # ‖bf16(W') − W'‖ / ‖W'‖, the 16-bit merge's own error


def read_base_quantization(adapter_folder: str | os.PathLike) -> dict[str, Any] | None:
    """The base quantization recorded by `splice train` next to the adapter (None: full precision)."""
    record = Path(adapter_folder) / "training.json"
    if not record.is_file():
        return None
    return json.loads(record.read_text()).get("base_quantization")


def export_merged(model_name: str, adapter_folder: str | os.PathLike, output: str | os.PathLike, *,
                  dtype: torch.dtype | None = None, base_quantization: dict | None | str = "auto",
                  requantize: bool = False) -> MergeReport:
    """Load `model_name`, apply the adapter, merge it and write a safetensors model folder.

    dtype: the written weights' dtype; default bf16 when the adapter was trained on a 4-bit base
    (a 16-bit merge), else the base model's dtype. The folder is written under a temporary name
    and renamed into place, so an interrupted export never leaves a half model."""
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new --output folder")
    quant = read_base_quantization(adapter_folder) if base_quantization == "auto" else base_quantization
    model, tokenizer = load_model(model_name)
    if quant and not quantized_layers(model):
        quantize_model(model, block_size=quant.get("block_size", 64),
                       double_quant=quant.get("double_quant", True))
    if quantized_layers(model):
        quant = quant or {"quant_type": "nf4"}
        dequantize_model(model, torch.float32)
        model.float()
    load_adapter(model, adapter_folder)
    plain = merge_and_unload(model)
    if requantize:
        return _write_requantized(plain, tokenizer, output, quant)
    dtype = dtype or (torch.bfloat16 if quant else next(plain.parameters()).dtype)
    plain.to(dtype)
    write_folder_atomically(output, lambda tmp: (plain.save_pretrained(tmp, safe_serialization=True),
                                       tokenizer is not None and tokenizer.save_pretrained(tmp)))
    return MergeReport(output, str(dtype).removeprefix("torch."), quant)


@torch.no_grad()
def requantization_errors(model: nn.Module, block_size: int = 64,
                          double_quant: bool = True) -> tuple[float, float]:
    """(NF4, bf16) relative Frobenius errors of storing the model's linear weights that way."""
    nf4_sq = bf16_sq = norm_sq = 0.0
    for _, layer in quantizable_linears(model):
        w = layer.weight.detach().float()
        q = dequantize_nf4(quantize_nf4(w, block_size=block_size, double_quant=double_quant))
        nf4_sq += float((q - w).pow(2).sum())
        bf16_sq += float((w.bfloat16().float() - w).pow(2).sum())
        norm_sq += float(w.pow(2).sum())
    return (nf4_sq / norm_sq) ** 0.5, (bf16_sq / norm_sq) ** 0.5


def _write_requantized(plain: nn.Module, tokenizer: Any, output: Path, quant: dict | None) -> MergeReport:
    settings = {"block_size": (quant or {}).get("block_size", 64),
                "double_quant": (quant or {}).get("double_quant", True)}
    nf4_error, bf16_error = requantization_errors(plain, **settings)
    quantize_model(plain, **settings)
    save_quantized(plain, output, tokenizer, info={"merged": True})
    return MergeReport(output, "nf4", quant, nf4_error, bf16_error)


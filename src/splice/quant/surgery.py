"""Swap a model's linear layers for NF4 `Linear4bit` layers, and back.

`quantize_model` replaces every nn.Linear except the output head (and any module named in
`skip`); embeddings and norms stay in their dtype, as QLoRA keeps them. It is all or nothing:
every layer is quantized first and the swaps happen only once all succeeded, so an error leaves
the model as it was. Quantize before attaching adapters: an adapter wraps the layer it finds,
and it must find the frozen 4-bit one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splice.quant.linear4bit import Linear4bit

DEFAULT_SKIP = ("lm_head",)


@dataclass(frozen=True)
class QuantizationReport:
    """What `quantize_model` did, measured from the tensors before and after."""

    modules: int
    quantized_params: int
    bytes_before: int      # the replaced weights, in their dtype
    bytes_after: int       # their codes and scales as held now

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.bytes_after / max(self.quantized_params, 1)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path`, in the train/eval mode of what stood there."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    module.train(getattr(parent, attr).training)
    setattr(parent, attr, module)


def quantizable_linears(model: nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    """(path, layer) of the plain nn.Linear layers `quantize_model` would replace."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = []
    for path, module in model.named_modules():
        if type(module) is not nn.Linear or module is head:
            continue
        if any(path == s or path.endswith("." + s) for s in skip):
            continue
        found.append((path, module))
    return found


@torch.no_grad()
def plan_quantization(model: nn.Module, *, block_size: int = 64, double_quant: bool = True,
                      compute_dtype: torch.dtype | None = None,
                      skip: tuple[str, ...] = DEFAULT_SKIP) -> list[tuple[str, Linear4bit]]:
    """(path, quantized layer) for every layer `quantize_model` replaces; the model is untouched.
    Raises (changing nothing) when a weight cannot be quantized."""
    return [(path, Linear4bit.from_linear(layer, block_size=block_size, double_quant=double_quant,
                                          compute_dtype=compute_dtype).train(layer.training))
            for path, layer in quantizable_linears(model, skip)]


@torch.no_grad()
def quantize_model(model: nn.Module, *, block_size: int = 64, double_quant: bool = True,
                   compute_dtype: torch.dtype | None = None,
                   skip: tuple[str, ...] = DEFAULT_SKIP) -> QuantizationReport:
    """Replace the model's linear layers by frozen NF4 layers, in place; see the module doc."""
    if "splice_adapters" in model.__dict__:
        raise ValueError("the model already carries adapters: quantize the base first, then attach "
                         "(splice.attach(model, config, quantize='nf4') does both in order)")
    targets = quantizable_linears(model, skip)
    if not targets:
        raise ValueError("the model has no nn.Linear layers to quantize (is it already quantized?)")
    bytes_before = sum(layer.weight.numel() * layer.weight.element_size() for _, layer in targets)
    params = sum(layer.weight.numel() for _, layer in targets)
    swaps = plan_quantization(model, block_size=block_size, double_quant=double_quant,
                              compute_dtype=compute_dtype, skip=skip)
    for path, quantized in swaps:
        _set_submodule(model, path, quantized)
    rehome_kept_tensors(model)
    return QuantizationReport(modules=len(swaps), quantized_params=params, bytes_before=bytes_before,
                              bytes_after=sum(q.storage_bytes() for _, q in swaps))


@torch.no_grad()
def rehome_kept_tensors(model: nn.Module) -> None:
    """Copy the tensors that stay in full precision (embeddings, norms, the head) into memory of
    their own. A model loaded from safetensors holds views of one memory-mapped file; as long as
    any view lives the whole mapping stays, and every page the quantizer read counts as resident:
    without this, dropping the full-precision linear weights frees nothing. A tied parameter is
    one object, so it is copied once and stays tied."""
    for module in model.modules():
        if isinstance(module, Linear4bit):
            continue
        for name, param in module.named_parameters(recurse=False):
            param.data = param.data.clone()
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.clone()


def quantized_layers(model: nn.Module) -> list[tuple[str, Linear4bit]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, Linear4bit)]


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Replace every `Linear4bit` by an nn.Linear holding its dequantized weight; returns the
    count. The weights are what the NF4 bytes stand for, not the original full-precision ones."""
    layers = quantized_layers(model)
    for path, layer in layers:
        _set_submodule(model, path, layer.to_linear(dtype))
    return len(layers)

"""A 4-bit model on disk: a transformers folder whose linear layers are stored in NF4.

    config.json             the model's transformers config (unchanged)
    model.safetensors       every other tensor in its dtype, and per quantized layer P:
                              P.packed (uint8), P.absmax (fp32, or uint8 codes when double
                              quantized), P.nested_absmax (fp32), P.offset (fp32, 0-dim), P.bias
                            with the header metadata P.shape, P.dtype, P.block_size,
                            P.double_block_size, P.quant_type = "nf4" (see nf4.to_state_dict)
    quantization.json       {"quant_type": "nf4", "modules": [P, ...], "compute_dtype", ...}
    tokenizer files         when the model has a tokenizer

`load_model(folder)` recognises the folder by quantization.json. Loading builds the model from its
config, then puts a `Linear4bit` at each P, so the full-precision skeleton exists once, briefly,
while loading. A tied output head is stored once (as the input embedding) and re-tied on load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from splice.quant.linear4bit import Linear4bit
from splice.quant.nf4 import from_state_dict, to_state_dict
from splice.quant.surgery import _set_submodule, quantized_layers

QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"


def is_quantized_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / QUANT_FILE).is_file()


def _tied_head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of an output head that shares its tensor with the input embedding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or head.weight is not embed.weight:
        return set()
    return {f"{path}.weight" for path, module in model.named_modules() if module is head}


def quantized_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(tensors, header metadata, quantized module paths) for the folder format above."""
    layers = quantized_layers(model)
    paths = [path for path, _ in layers]
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path, layer in layers:
        held, meta = to_state_dict(layer.quant, prefix=f"{path}.")
        tensors |= held
        metadata |= meta
        if layer.bias is not None:
            tensors[f"{path}.bias"] = layer.bias.detach()
    skip = _tied_head_keys(model)
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in paths or key in skip:
            continue
        tensors[key] = value.detach()
    return {k: v.contiguous() for k, v in tensors.items()}, metadata, paths


def save_quantized(model: nn.Module, folder: str | os.PathLike, tokenizer: Any = None,
                   info: dict[str, Any] | None = None) -> Path:
    """Write the 4-bit model folder, atomically (a temporary folder renamed into place)."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists and is not empty; choose a new --output folder")
    tensors, metadata, paths = quantized_state(model)
    if not paths:
        raise ValueError("the model has no quantized layers; run splice.quant.quantize_model first")
    layers = dict(quantized_layers(model))
    first = layers[paths[0]]
    summary = {"quant_type": "nf4", "block_size": first.block_size,
               "double_quant": first.double_quant, "double_block_size": first.double_block_size,
               "compute_dtype": str(first.compute_dtype).removeprefix("torch."),
               "modules": paths} | (info or {})

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        save_file(tensors, tmp / WEIGHTS_FILE, metadata=metadata | {"format": "pt"})
        (tmp / QUANT_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    write_folder_atomically(folder, write)
    return folder


def write_folder_atomically(folder: Path, write: Callable[[Path], Any]) -> None:
    """Run `write(tmp)` on a fresh sibling folder, then rename it to `folder` (absent or empty):
    an interrupted write leaves no half folder behind."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        write(tmp)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@torch.no_grad()
def load_quantized(folder: str | os.PathLike, model_class: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model written by `save_quantized` (model_class: a transformers auto class)."""
    from transformers import AutoConfig  # the folder format is a transformers one

    folder = Path(folder)
    summary = json.loads((folder / QUANT_FILE).read_text())
    if summary.get("quant_type") != "nf4":
        raise ValueError(f"{folder / QUANT_FILE}: quant_type {summary.get('quant_type')!r} is not "
                         "supported (splice reads 'nf4')")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = model_class.from_config(config, dtype=dtype)
    compute_dtype = getattr(torch, summary.get("compute_dtype", "float32"))
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    for path in summary["modules"]:
        quant = from_state_dict(tensors, metadata, prefix=f"{path}.")
        layer = Linear4bit(quant, tensors.get(f"{path}.bias"), compute_dtype)
        _set_submodule(model, path, layer)
    quant_keys = {k for k in tensors if k.rpartition(".")[0] in set(summary["modules"])}
    rest = {k: v.to(dtype) if v.is_floating_point() else v
            for k, v in tensors.items() if k not in quant_keys}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in set(summary["modules"])
               and k not in _tied_head_keys(model)]
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()

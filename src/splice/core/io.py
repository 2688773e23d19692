"""Adapter folders in peft's layout: `adapter_config.json` + `adapter_model.safetensors`.

Files written here load in peft (and so in the servers that read peft adapters), and peft's
files load here. Weights are only ever read from safetensors: a pickle is never unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from splice.config.base import AdapterConfig
from splice.core.attach import attach
from splice.core.errors import AdapterFileError
from splice.core.keys import adapter_tensors
from splice.core.layer import adapter_layers
from splice.core.registry import method_for_peft_config
from splice.core.state import require_adapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")

TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM",  # GPT2LMHeadModel
              "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM"}


def task_type_of(model: nn.Module) -> str | None:
    cls_name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES.items() if cls_name.endswith(suffix)), None)


def atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename over the target."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def adapter_file_config(model: nn.Module, name: str, converted: bool = False) -> dict[str, Any]:
    """adapter_config.json for adapter `name`, as peft writes it (`converted`: for the tensors
    of `converted_tensors`, a plain LoRA of twice the rank)."""
    config = require_adapter(model, name).config
    if converted:
        config = config.converted_to_plain()
    data = config.to_peft_dict()
    layers = [(p, layer) for p, layer in adapter_layers(model) if layer.has_adapter(name)]
    if config.target_modules == "all-linear":
        # Resolved to concrete names, as peft records it, so every reader selects the same modules.
        data["target_modules"] = sorted({p.rsplit(".", 1)[-1] for p, layer in layers
                                         if not hasattr(layer, "modules_to_save")})
    if "fan_in_fan_out" in data:
        data["fan_in_fan_out"] = any(getattr(layer, "fan_in_fan_out", False) for _, layer in layers)
    data.update(task_type=task_type_of(model), inference_mode=True, revision=None,
                # peft writes null, not "", for a model that was not loaded from a path.
                base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path",
                                                None) or None)
    return data


def converted_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor] | None:
    """Adapter `name`'s tensors for the untouched base, where its init left the base a residual
    (PiSSA, OLoRA, LoRA-GA: W - s·B₀A₀); None for an adapter whose base is the original.

    A layer that can say so offers `converted_file_tensors(name)` (LoRA's layers: see Note:
    Inits that change the base in methods/lora.py); the update it stands for is
    s·(B·A - B₀·A₀), so the file holds [A | A₀] and [B | -B₀], rank 2r."""
    tensors = adapter_tensors(model, name)
    converted = False
    for path, layer in adapter_layers(model):
        convert = getattr(layer, "converted_file_tensors", None)
        values = convert(name) if convert is not None and layer.has_adapter(name) else None
        if values:
            prefix = layer.file_key_prefix(path)
            tensors.update({prefix + key: value for key, value in values.items()})
            converted = True
    return tensors if converted else None


def save_adapter(model: nn.Module, folder: str | os.PathLike, name: str = "default", *,
                 convert: bool = True) -> Path:
    """Write adapter `name` to `folder` in peft's format; each file is replaced atomically.

    An adapter whose init left the base a residual (init pissa, olora or lora_ga: the model's
    base weights are W - s·B₀A₀, not W) is saved, by default, converted for the untouched base:
    [A | A₀] and [B | -B₀] at rank 2r with alpha doubled (x sqrt(2) under rsLoRA), so s is the
    same and the file loads in peft and in splice on the original model with the trained
    model's logits (peft's `path_initial_model_for_weight_conversion` writes the same). With
    `convert=False` the file holds A and B as they are, rank r: it applies only to this model's
    residual base."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    converted = converted_tensors(model, name) if convert else None
    live = adapter_tensors(model, name) if converted is None else converted
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in live.items()}
    config = adapter_file_config(model, name, converted=converted is not None)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return folder


def read_adapter_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {str(folder)!r} does not exist; give the folder that "
                               f"holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterFileError(f"{str(folder)!r} has no {CONFIG_FILE}: it is not an adapter folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}); re-save the adapter") from None


def read_adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        pickles = [p for p in PICKLE_FILES if (folder / p).exists()]
        if pickles:
            raise AdapterFileError(
                f"{folder / pickles[0]} is a pickle file, and splice never unpickles (it can run "
                "arbitrary code). Convert it where you trust it: load it with torch.load and save "
                f"the tensors with safetensors.torch.save_file to {WEIGHTS_FILE}")
        raise AdapterFileError(f"{str(folder)!r} has no {WEIGHTS_FILE}; the adapter's weights are missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(f"{path} is corrupt or truncated and cannot be read ({err}); "
                               "re-save or re-download the adapter") from None


def load_adapter(model: nn.Module, folder: str | os.PathLike, name: str = "default", *,
                 activate: bool = True) -> nn.Module:
    """Attach the adapter saved in `folder` (splice's or peft's) as `name`; atomic on failure."""
    config, weights = read_adapter_folder(folder)
    return attach(model, config, name, activate=activate, weights=weights)


def read_adapter_folder(folder: str | os.PathLike) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The config (in its method's class) and the tensors of an adapter folder, peft's or ours."""
    folder = Path(folder)
    data = read_adapter_config(folder)
    try:
        spec = method_for_peft_config(data)
    except ValueError as err:
        raise AdapterFileError(f"{folder / CONFIG_FILE}: {err}") from None
    return spec.config_cls.from_peft_dict(data), read_adapter_weights(folder)

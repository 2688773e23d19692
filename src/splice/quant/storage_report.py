"""Bytes a model takes, measured from the tensors it holds (in memory or in a 4-bit folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from torch import nn

from splice.quant.folder import QUANT_FILE, WEIGHTS_FILE

_QUANT_LEAVES = ("packed", "absmax", "nested_absmax", "offset")


@dataclass(frozen=True)
class StorageReport:
    total_bytes: int          # every distinct tensor, as held
    bf16_bytes: int           # the same tensors with floating-point ones at 2 bytes
    quantized_bytes: int = 0  # NF4 codes and scales
    quantized_params: int = 0
    file_bytes: int = 0       # the weights file's size on disk (0 for an in-memory model)

    @property
    def rest_bytes(self) -> int:
        return self.total_bytes - self.quantized_bytes

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.quantized_bytes / max(self.quantized_params, 1)


def measure_storage(model: nn.Module) -> StorageReport:
    """Bytes of the model's distinct parameters and buffers (a tied tensor counts once)."""
    seen: dict[int, tuple[int, int]] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        size = tensor.numel() * tensor.element_size()
        bf16 = tensor.numel() * 2 if tensor.is_floating_point() else size
        seen[key] = max(seen.get(key, (0, 0)), (size, bf16))
    return StorageReport(total_bytes=sum(s for s, _ in seen.values()),
                         bf16_bytes=sum(b for _, b in seen.values()))


def measure_folder(folder: str | Path) -> StorageReport:
    """Bytes of the tensors in a 4-bit folder's weights file, split into NF4 and the rest."""
    folder = Path(folder)
    modules = set(json.loads((folder / QUANT_FILE).read_text())["modules"])
    total = bf16 = quantized = params = 0
    with safe_open(folder / WEIGHTS_FILE, framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            tensor = f.get_tensor(key)
            size = tensor.numel() * tensor.element_size()
            total += size
            owner, _, leaf = key.rpartition(".")
            if owner in modules and leaf in _QUANT_LEAVES:
                quantized += size
                bf16 += size
            else:
                bf16 += tensor.numel() * 2 if tensor.is_floating_point() else size
    for path in modules:
        shape = json.loads(metadata[f"{path}.shape"])
        params += shape[0] * shape[1]
    return StorageReport(total_bytes=total, bf16_bytes=bf16, quantized_bytes=quantized,
                         quantized_params=params, file_bytes=(folder / WEIGHTS_FILE).stat().st_size)

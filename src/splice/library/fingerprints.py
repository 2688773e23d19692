"""Base-model fingerprints for the library, computed once and then reused.

`model_fingerprint` hashes every base weight (~1 s for SmolLM2-135M), too slow to repeat on
every adapter load. Two caches avoid it:

- a resident model's fingerprint is remembered with a stamp of its base tensors (address and
  version counter); any in-place change (an optimizer step, a merge, `load_state_dict`) bumps
  the counter, so a changed base is hashed again;
- a model named on the command line (an alias or a folder) is remembered in the library's
  manifest with the size and mtime of each file in the folder it was loaded from, so the next
  `splice library add --model M` skips loading M.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Any

from torch import nn

from splice.models import base_parameter_name, load_model, model_fingerprint

_RESIDENT: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def resident_fingerprint(model: nn.Module) -> str:
    """`model_fingerprint(model)`, hashed again only when a base tensor changed since last time."""
    stamp = _base_tensor_stamp(model)
    cached = _RESIDENT.get(model)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    fingerprint = model_fingerprint(model)
    _RESIDENT[model] = (stamp, fingerprint)
    return fingerprint


def _base_tensor_stamp(model: nn.Module) -> tuple:
    # Keyed by the unwrapped name, so attaching an adapter (which renames base weights to
    # `...base_layer.weight` without touching them) keeps the stamp.
    rows = []
    for name, param in model.named_parameters():
        base = base_parameter_name(name)
        if base is not None:
            rows.append((base, param.data_ptr(), param._version, tuple(param.shape),
                         str(param.dtype), str(param.device)))
    return tuple(sorted(rows))


def cache_key(name: str) -> str:
    """How a model name is filed in the cache: a folder by its absolute path, an alias as is."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


def folder_stamp(folder: Path) -> list[list[Any]]:
    """[name, size, mtime_ns] of each file directly in `folder`, sorted by name."""
    rows = []
    for entry in os.scandir(folder):
        if entry.is_file():
            info = entry.stat()
            rows.append([entry.name, info.st_size, info.st_mtime_ns])
    return sorted(rows)


def cached_fingerprint(name: str, cache: dict[str, Any]) -> str | None:
    """The fingerprint `cache` holds for model `name`, if its files are unchanged since."""
    record = cache.get(cache_key(name))
    if not record:
        return None
    folder = Path(record["folder"])
    if not folder.is_dir() or folder_stamp(folder) != record["stamp"]:
        return None
    return record["fingerprint"]


def load_and_fingerprint(name: str) -> tuple[nn.Module, str, dict[str, Any] | None]:
    """Load model `name` (fp32, as every splice command does), hash it, and make a cache record.

    The record is None when the model did not come from a local folder (nothing to stamp).
    """
    model, _ = load_model(name)
    fingerprint = resident_fingerprint(model)
    source = getattr(getattr(model, "config", None), "name_or_path", None)
    record = None
    if source and Path(source).is_dir():
        folder = Path(source).resolve()
        record = {"folder": str(folder), "stamp": folder_stamp(folder), "fingerprint": fingerprint}
    return model, fingerprint, record

"""Export a base model with an adapter folded in, as a standalone transformers folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from splice.core.io import load_adapter
from splice.core.merging import merge_and_unload
from splice.models import load_model


def export_merged(model_name: str, adapter_folder: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Load `model_name`, apply the adapter, merge it and write a safetensors model folder.

    The folder is written under a temporary name and renamed into place, so an interrupted export
    never leaves a half model. transformers alone reloads the result."""
    model, tokenizer = load_model(model_name)
    load_adapter(model, adapter_folder)
    plain = merge_and_unload(model)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty; choose a new --output folder")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output

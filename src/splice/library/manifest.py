"""The library's files: `library.json` (the base it is bound to) and each entry's
`library_entry.json` (what the adapter is and where it came from).

    <library>/library.json                         format, base fingerprint, model, created,
                                                   fingerprint cache of named models
    <library>/adapters/<name>/                     the adapter folder's files, verbatim
    <library>/adapters/<name>/library_entry.json   method, rank, targets, size, created, notes,
                                                   source, recorded base fingerprint, provenance
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from splice.core.errors import AdapterFileError
from splice.core.io import WEIGHTS_FILE, atomic_write, read_adapter_config
from splice.core.registry import method_for_peft_config
from splice.library.errors import LibraryError

FORMAT = 1
MANIFEST_FILE = "library.json"
ENTRY_FILE = "library_entry.json"
TRAINING_FILE = "training.json"

PROVENANCE = {
    "recorded": "the adapter's training.json records this library's base fingerprint",
    "saved": "saved from a resident model whose weights are this library's base",
    "fits-model": "no recorded fingerprint; it attached cleanly to the library's base model",
    "unknown": "no recorded fingerprint and no model to check it against",
    "forced": "added with force: its base fingerprint differed, or it did not fit the model",
}
"""How an entry's base was established, as recorded in `LibraryEntry.provenance`."""


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    """library.json: the base model this library is bound to."""

    base_fingerprint: str
    model: str | None
    created: str
    fingerprint_cache: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT

    @classmethod
    def read(cls, path: Path) -> "Manifest | None":
        if not path.is_file():
            return None
        data = _read_json(path)
        if data.get("format") != FORMAT:
            raise LibraryError(f"{path} has format {data.get('format')!r}; this splice reads format "
                               f"{FORMAT}: upgrade splice or use another library folder")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def write(self, path: Path) -> None:
        text = json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))


@dataclass(frozen=True)
class LibraryEntry:
    """One adapter in the library, as `list` and `show` report it."""

    name: str
    method: str
    rank: int | None
    """The method's rank where it has one (LoRA, DoRA), else None."""
    targets: tuple[str, ...] | str | None
    size_bytes: int
    """Bytes of the adapter's files (library_entry.json excluded)."""
    created: str
    notes: str
    source: str
    base_fingerprint: str | None
    """The base fingerprint the adapter itself records (training.json), if any."""
    provenance: str
    """How the base was established: a key of PROVENANCE."""
    path: Path

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["targets"] = list(self.targets) if isinstance(self.targets, tuple) else self.targets
        return data

    def write(self, folder: Path) -> None:
        data = {k: v for k, v in self.to_json().items() if k not in ("name", "path")}
        text = json.dumps({"format": FORMAT, **data}, indent=2, sort_keys=True) + "\n"
        atomic_write(folder / ENTRY_FILE, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def read(cls, folder: Path) -> "LibraryEntry":
        data = _read_json(folder / ENTRY_FILE)
        targets = data.get("targets")
        return cls(name=folder.name, method=data["method"], rank=data.get("rank"),
                   targets=tuple(targets) if isinstance(targets, list) else targets,
                   size_bytes=data["size_bytes"], created=data["created"],
                   notes=data.get("notes", ""), source=data.get("source", ""),
                   base_fingerprint=data.get("base_fingerprint"),
                   provenance=data.get("provenance", "unknown"), path=folder)


@dataclass(frozen=True)
class AdapterSummary:
    """What an adapter folder holds, read from its files before it is copied in."""

    method: str
    rank: int | None
    targets: tuple[str, ...] | str | None
    recorded_fingerprint: str | None


def inspect_adapter(folder: Path) -> AdapterSummary:
    """Check `folder` is a loadable adapter (config, method, whole safetensors) and summarise it."""
    data = read_adapter_config(folder)
    try:
        spec = method_for_peft_config(data)
        with warnings.catch_warnings():  # unknown-key warnings belong to load time, not here
            warnings.simplefilter("ignore")
            config = spec.config_cls.from_peft_dict(data)
    except ValueError as err:
        raise AdapterFileError(f"{folder}: {err}") from None
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFileError(f"{folder} has no {WEIGHTS_FILE}; only adapters saved in "
                               "safetensors can be added (re-save the adapter)")
    try:
        with safe_open(weights, framework="pt"):
            pass  # the header check catches a truncated or corrupt file
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{weights} is corrupt or truncated ({err}); re-save the adapter") from None
    return AdapterSummary(method=spec.name, rank=getattr(config, "rank", None),
                          targets=config.target_modules, recorded_fingerprint=recorded_fingerprint(folder))


def recorded_fingerprint(folder: Path) -> str | None:
    """The base fingerprint `splice train` recorded in training.json, if the folder has one."""
    path = folder / TRAINING_FILE
    if not path.is_file():
        return None
    value = _read_json(path).get("base_model_fingerprint")
    if value is not None and not (isinstance(value, str) and len(value) == 64):
        raise AdapterFileError(f"{path}: base_model_fingerprint {value!r} is not a sha256 hex "
                               "digest; fix or delete training.json")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LibraryError(f"{path} is not valid JSON ({err}); restore it or remove that entry") from None
    if not isinstance(data, dict):
        raise LibraryError(f"{path} does not hold a JSON object; restore it or remove that entry")
    return data

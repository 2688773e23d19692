"""The Library panel: adapters from an on-disk library, merged into the resident base one at a
time (or blended), with the same prompt answered by the base and by the model as it stands.

At most one thing is folded into the base at a time: a library adapter, or a blend of two
(their linear composition Σ wᵢΔWᵢ, built as a new LoRA adapter and merged like any other).
Applying one first takes the previous one out. The base's answer comes from the same weights
with every adapter taken out for the call (`disable_adapters`).

Every entry is loaded (inactive) when the bench opens, while the base is still unmerged: the
library's base check hashes the resident weights, which merging changes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from splice.core.attach import (delete_adapter, disable_adapters, list_adapters,
                                set_active_adapters)
from splice.core.errors import AdapterError, SpliceError
from splice.core.merging import check_mergeable, merge_adapter, unmerge_adapter
from splice.generation import generate_reply
from splice.library import AdapterLibrary
from splice.merge.compose_model import compose_adapters

BLEND = "lab-blend"
DEFAULT_PROMPT = ("Rewrite as one line: name=...; age=...; job=...; city=...\n"
                  "Julia Romero, 73, firefighter from Bologna")


@dataclass
class Applied:
    """What is folded into the base now: nothing, one entry, or a blend."""

    kind: str = "none"                                # "none" | "merge" | "blend"
    names: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": self.names, "weights": self.weights}


class LibraryBench:
    """Merge, unmerge and blend library adapters on `model`; answer prompts base vs current.

    One lock serialises everything that touches the model (requests run on worker threads)."""

    def __init__(self, model: nn.Module, tokenizer, library: AdapterLibrary | None, *,
                 max_new_tokens: int = 24) -> None:
        self.model, self.tokenizer, self.library = model, tokenizer, library
        self.max_new_tokens = max_new_tokens
        self.applied = Applied()
        self.load_errors: dict[str, str] = {}
        self._lock = threading.Lock()
        for entry in library.list() if library is not None else []:
            try:
                library.load_into(model, entry.name, activate=False)
            except SpliceError as err:
                self.load_errors[entry.name] = str(err)

    def entries(self) -> list[dict[str, Any]]:
        rows = []
        for entry in self.library.list() if self.library is not None else []:
            rows.append({"name": entry.name, "method": entry.method, "rank": entry.rank,
                         "targets": entry.to_json()["targets"], "size_bytes": entry.size_bytes,
                         "notes": entry.notes, "error": self.load_errors.get(entry.name, ""),
                         "loaded": entry.name in list_adapters(self.model)})
        return rows

    def state(self) -> dict[str, Any]:
        return {"folder": str(self.library.folder) if self.library is not None else None,
                "entries": self.entries(), "applied": self.applied.to_json()}

    # -- changing what is folded in -----------------------------------------------------------
    def merge(self, name: str) -> dict[str, Any]:
        with self._lock:
            self._require_loaded(name)
            check_mergeable(self.model, name)
            self._take_out()
            set_active_adapters(self.model, [name])
            merge_adapter(self.model, name)
            self.applied = Applied("merge", [name], [1.0])
        return self.state()

    def unmerge(self) -> dict[str, Any]:
        with self._lock:
            self._take_out()
        return self.state()

    def blend(self, names: list[str], weights: list[float]) -> dict[str, Any]:
        """Fold Σ wᵢΔWᵢ of the named entries into the base (linear composition)."""
        with self._lock:
            for name in names:
                self._require_loaded(name)
            self._take_out()
            compose_adapters(self.model, names, weights, "linear", new_name=BLEND)
            set_active_adapters(self.model, [BLEND])
            merge_adapter(self.model, BLEND)
            self.applied = Applied("blend", list(names), [float(w) for w in weights])
        return self.state()

    def answer(self, prompt: str) -> dict[str, Any]:
        """The prompt answered greedily by the base and by the model with what is applied."""
        with self._lock:
            with disable_adapters(self.model):
                base = self._reply(prompt)
            current = self._reply(prompt)
            return {"prompt": prompt, "base": base, "current": current,
                    "applied": self.applied.to_json()}

    # -- internals ----------------------------------------------------------------------------
    def _reply(self, prompt: str) -> str:
        return generate_reply(self.model, self.tokenizer, prompt,
                              max_new_tokens=self.max_new_tokens, out=None)

    def _take_out(self) -> None:
        """Back to the plain base: unmerge, deactivate, and drop the blend adapter."""
        if self.applied.kind != "none":
            unmerge_adapter(self.model)
            set_active_adapters(self.model, [])
            if BLEND in list_adapters(self.model):
                delete_adapter(self.model, BLEND)
        self.applied = Applied()

    def _require_loaded(self, name: str) -> None:
        if name in self.load_errors:
            raise AdapterError(f"adapter {name!r} could not be loaded: {self.load_errors[name]}")
        if name not in list_adapters(self.model) or name == BLEND:
            known = ", ".join(e["name"] for e in self.entries()) or "none"
            raise AdapterError(f"no library adapter named {name!r}; the library holds: {known}")


"""Which library adapters are attached to the served model: an LRU with a cap, and versions.

A request names an adapter of the library; it runs on a *version*: the adapter as the library
held it when the request started, attached under an internal slot name (`slot-7`) that no
request ever supplies. Replacing or removing the library entry retires the version: requests
already running finish on it, new ones get a fresh version, and the retired slot is detached
when its last request ends. Names from requests are only ever looked up in the library's index
(`entry`); the file path comes from the index, never from the request.

Loading is split so that decoding never waits for a disk: a loader thread reads the adapter's
files (`read_adapter_folder`), and the scheduler attaches the tensors between two steps
(`attach_loaded`). Only the scheduler thread calls the methods that touch the model
(`acquire`, `release`, `attach_loaded`, `collect`); `entry`, `names`, `refresh` and `retire` are
safe from any thread.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from splice.core.attach import attach, delete_adapter
from splice.core.io import read_adapter_folder
from splice.library import AdapterLibrary, LibraryEntry

INDEX_TTL_S = 2.0  # how stale the in-memory index may get before a request re-reads the library


@dataclass(eq=False)
class Version:
    """One attached (or loading) copy of a library adapter."""

    name: str                      # the library entry's name
    slot: str                      # the adapter name on the model
    stamp: tuple                   # what identifies the entry's content (created, size)
    future: Future | None          # the loader's read, until attached
    users: int = 0                 # requests queued or running on this version
    retired: bool = False
    error: str | None = None
    last_used: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.future is None and self.error is None


def stamp_of(entry: LibraryEntry) -> tuple:
    return (entry.created, entry.size_bytes)


class Residency:
    """The adapters of `library` attached to `model`, at most `max_resident` idle ones kept."""

    def __init__(self, model: nn.Module, library: AdapterLibrary | None, max_resident: int) -> None:
        self.model = model
        self.library = library
        self.max_resident = max_resident
        self._lock = threading.Lock()
        self._index: dict[str, LibraryEntry] = {}
        self._index_time = float("-inf")
        self._current: dict[str, Version] = {}   # library name -> the version new requests get
        self._versions: list[Version] = []       # every version attached or loading
        self._slots = itertools.count()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="splice-adapter-loader")
        self.refresh()

    # -- any thread -------------------------------------------------------------------------
    def refresh(self) -> None:
        """Re-read the library's index (after an add or remove, or when it may be stale)."""
        entries = self.library.list() if self.library is not None else []
        with self._lock:
            self._index = {entry.name: entry for entry in entries}
            self._index_time = time.monotonic()

    def entry(self, name: str) -> LibraryEntry | None:
        """The library entry called `name`, or None; a miss re-reads the index once."""
        with self._lock:
            entry = self._index.get(name)
            stale = time.monotonic() - self._index_time > INDEX_TTL_S
        if entry is None or stale:
            self.refresh()
            with self._lock:
                entry = self._index.get(name)
        return entry

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._index)

    def retire(self, name: str) -> None:
        """New requests for `name` get a new version; running ones finish on theirs."""
        with self._lock:
            version = self._current.pop(name, None)
            if version is not None:
                version.retired = True

    def resident(self) -> int:
        """Versions attached to the model now."""
        with self._lock:
            return sum(v.ready for v in self._versions)

    # -- scheduler thread -------------------------------------------------------------------
    def acquire(self, name: str) -> Version:
        """The version of `name` a new request runs on (loading it if needed); call `release`
        when the request ends. Raises LookupError when the library has no such entry."""
        entry = self.entry(name)
        if entry is None:
            raise LookupError(name)
        with self._lock:
            version = self._current.get(name)
            if version is not None and (version.stamp != stamp_of(entry) or version.error):
                version.retired = True
                version = None
            if version is None:
                version = Version(name, f"slot-{next(self._slots)}", stamp_of(entry),
                                  self._loader.submit(read_adapter_folder, entry.path))
                self._current[name] = version
                self._versions.append(version)
            version.users += 1
            version.last_used = time.monotonic()
        return version

    def release(self, version: Version) -> None:
        with self._lock:
            version.users -= 1
            version.last_used = time.monotonic()

    def attach_loaded(self) -> None:
        """Attach every version whose files have been read; a failed read or attach marks the
        version with its error (its requests fail, the next request tries again)."""
        for version in [v for v in self._versions if v.future is not None and v.future.done()]:
            future, version.future = version.future, None
            try:
                config, weights = future.result()
                # Outside inference mode (the scheduler decodes in it): inference tensors have
                # no version counter, so the routed path could not cache their stacked weights
                # and would rebuild them on every forward (methods/lora_batched.py).
                with torch.inference_mode(False), torch.no_grad():
                    attach(self.model, config, version.slot, activate=False, weights=weights)
            except Exception as err:  # a broken adapter file fails its requests, not the server
                version.error = f"adapter {version.name!r} could not be loaded: {err}"
                with self._lock:
                    if self._current.get(version.name) is version:
                        del self._current[version.name]

    def collect(self) -> None:
        """Detach retired versions nobody uses, then idle ones over the cap, least recent first."""
        with self._lock:
            unused = [v for v in self._versions if v.users == 0 and v.future is None]
            drop = [v for v in unused if v.retired or v.error]
            idle = sorted((v for v in unused if v not in drop), key=lambda v: v.last_used)
            attached = sum(v.ready for v in self._versions) - sum(v.ready for v in drop)
            drop += idle[:max(0, attached - self.max_resident)]
            for version in drop:
                self._versions.remove(version)
                if self._current.get(version.name) is version:
                    del self._current[version.name]
        for version in drop:
            if version.error is None:
                delete_adapter(self.model, version.slot)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

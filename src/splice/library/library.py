"""`AdapterLibrary`: a folder of adapters bound to one base model by the fingerprint of its weights.

    library = AdapterLibrary("adapters/")
    library.add("support-bot", "runs/support", model="smollm2-135m", notes="v2 data")
    library.list()                                   # name, method, rank, targets, size, ...
    library.load_into(model, "support-bot")          # attaches it as adapter "support-bot"

Checking an adapter's base. The library is bound to the fingerprint of the first base model
it is given (`splice.models.model_fingerprint`). An adapter from `splice train` records its
base's fingerprint in training.json; a different one is refused with both fingerprints named
(force=True / --force overrides). An adapter without one (peft's folders, hand-made ones) is
attached to the base model when one is given, and refused if its targets or shapes do not fit;
with no model it is accepted with provenance "unknown". `LibraryEntry.provenance` records
which check it passed (see `manifest.PROVENANCE`).

Writes hold the library's file lock (`lock.write_lock`). An entry is built in a private
`adapters/.tmp-*` folder and renamed into place, so a crash mid-add leaves no half entry, only
a `.tmp-*` folder that the next open or write deletes; removal renames the entry to
`.trash-*` before deleting it. Only the files directly in an adapter folder are copied:
subfolders (training checkpoints) stay behind.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from splice.core.attach import delete_adapter
from splice.core.errors import SpliceError
from splice.core.io import load_adapter, save_adapter
from splice.core.state import require_adapter
from splice.library.errors import (BaseMismatchError, EntryExistsError, EntryNotFoundError,
                                   LibraryError, LibraryNameError)
from splice.library.fingerprints import (cache_key, cached_fingerprint, load_and_fingerprint,
                                         resident_fingerprint)
from splice.library.lock import write_lock
from splice.library.manifest import (ENTRY_FILE, MANIFEST_FILE, AdapterSummary, LibraryEntry,
                                     Manifest, inspect_adapter, now_utc)
from splice.models import load_model

ADAPTERS_DIR = "adapters"
TMP_PREFIX, TRASH_PREFIX = ".tmp-", ".trash-"
# The same alphabet as adapter names, so an entry's name is also the name it loads under.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,99}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name == "__base__":
        raise LibraryNameError(
            f"library name {name!r} is invalid: use 1-100 letters, digits, '_' or '-', not starting "
            "with '-' (no dots, no '..', no path separators), so it is also a valid adapter name")
    return name


@dataclass
class _Base:
    """A base model given to a write: its fingerprint, and the module once one is loaded."""

    label: str
    fingerprint: str
    module: nn.Module | None = None
    cache_record: dict | None = None

    def loaded(self) -> nn.Module:
        if self.module is None:
            self.module = load_model(self.label)[0]
        return self.module


class AdapterLibrary:
    """An on-disk adapter library at `folder`, created by its first `add`.

    Opening it deletes leftovers of crashed writes when no other process is writing.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.adapters_dir = self.folder / ADAPTERS_DIR
        if self.adapters_dir.is_dir():
            with write_lock(self.folder, wait=False) as held:
                if held:
                    self._discard_leftovers()

    # -- reading ------------------------------------------------------------------------------
    @property
    def exists(self) -> bool:
        return (self.folder / MANIFEST_FILE).is_file()

    @property
    def manifest(self) -> Manifest | None:
        """library.json: the bound base, or None before the first add."""
        return Manifest.read(self.folder / MANIFEST_FILE)

    @property
    def base_fingerprint(self) -> str | None:
        manifest = self.manifest
        return manifest.base_fingerprint if manifest else None

    def list(self) -> list[LibraryEntry]:
        """Every entry, sorted by name; an entry being removed or renamed meanwhile may be missed."""
        if not self.adapters_dir.is_dir():
            return []
        entries = []
        for child in sorted(self.adapters_dir.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            try:
                entries.append(LibraryEntry.read(child))
            except FileNotFoundError:
                continue  # renamed away by a concurrent remove or rename
        return entries

    def show(self, name: str) -> LibraryEntry:
        path = self.adapters_dir / check_name(name)
        if not (path / ENTRY_FILE).is_file():
            raise EntryNotFoundError(f"no adapter named {name!r} in library {self.folder}; "
                                     f"`splice library list --library {self.folder}` shows its entries")
        return LibraryEntry.read(path)

    # -- writing ------------------------------------------------------------------------------
    def add(self, name: str, folder: str | os.PathLike, *, model: nn.Module | str | os.PathLike | None = None,
            notes: str = "", force: bool = False) -> LibraryEntry:
        """Copy the adapter folder `folder` in as `name`.

        `model` (a resident model, an alias or a model folder) is the base to check against;
        the first add binds the library to it. Needed for the first add unless the adapter
        records its base fingerprint. A named model's fingerprint is cached in library.json.
        """
        check_name(name)
        self._require_free(name)  # before the slow checks; again under the lock
        folder = Path(folder)
        summary = inspect_adapter(folder)
        base = self._resolve_base(model)
        recorded = summary.recorded_fingerprint
        forced = self._check_base(name, base, recorded, force)
        provenance = "forced" if forced else "recorded" if recorded else "unknown"
        if base is not None and recorded is None and not forced:
            forced = not self._check_fits(name, folder, base, force)
            provenance = "forced" if forced else "fits-model"

        def fill(tmp: Path) -> AdapterSummary:
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name != ENTRY_FILE:
                    shutil.copyfile(path, tmp / path.name)
            return summary

        return self._write_entry(name, fill, base, recorded, provenance, notes,
                                 source=str(folder.resolve()), force=force)

    def add_from_model(self, name: str, model: nn.Module, *, adapter: str = "default",
                       notes: str = "", force: bool = False) -> LibraryEntry:
        """Save adapter `adapter` of the resident `model` into the library as `name`."""
        check_name(name)
        self._require_free(name)
        require_adapter(model, adapter)
        base = self._resolve_base(model)
        forced = self._check_base(name, base, None, force)

        def fill(tmp: Path) -> AdapterSummary:
            save_adapter(model, tmp, adapter)
            return inspect_adapter(tmp)

        return self._write_entry(name, fill, base, None, "forced" if forced else "saved", notes,
                                 source=f"model {base.label}, adapter {adapter!r}", force=force)

    def remove(self, name: str) -> None:
        with write_lock(self.folder):
            path = self.show(name).path
            trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=self.adapters_dir))
            os.rename(path, trash / name)  # the entry vanishes here, whole
            shutil.rmtree(trash)

    def rename(self, old: str, new: str) -> LibraryEntry:
        check_name(new)
        with write_lock(self.folder):
            path = self.show(old).path
            self._require_free(new)
            os.rename(path, self.adapters_dir / new)
        return self.show(new)

    # -- loading ------------------------------------------------------------------------------
    def load_into(self, model: nn.Module, name: str, adapter_name: str | None = None, *,
                  activate: bool = True, force: bool = False) -> nn.Module:
        """Attach entry `name` to the resident `model` (as `adapter_name`, default `name`).

        The model's base fingerprint must be the library's (hashed once per model, then
        reused until a base weight changes); force=True skips the check, e.g. for a
        4-bit copy of the base, whose weights hash differently.
        """
        entry = self.show(name)
        manifest = self.manifest
        if manifest is not None and not force:
            fingerprint = resident_fingerprint(model)
            if fingerprint != manifest.base_fingerprint:
                raise BaseMismatchError(
                    f"cannot load {name!r} into this model: its base weights have fingerprint "
                    f"{fingerprint}, but library {self.folder} holds adapters for the base with "
                    f"fingerprint {manifest.base_fingerprint} (model {manifest.model}). Load that "
                    "base model, or pass force=True to load it anyway")
        return load_adapter(model, entry.path, adapter_name or name, activate=activate)

    # -- internals ----------------------------------------------------------------------------
    def _resolve_base(self, model: nn.Module | str | os.PathLike | None) -> _Base | None:
        if model is None:
            return None
        if isinstance(model, nn.Module):
            label = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
            return _Base(label, resident_fingerprint(model), model)
        label = os.fspath(model)
        manifest = self.manifest
        fingerprint = cached_fingerprint(label, manifest.fingerprint_cache if manifest else {})
        if fingerprint is not None:
            return _Base(label, fingerprint)
        module, fingerprint, record = load_and_fingerprint(label)
        return _Base(label, fingerprint, module, record)

    def _check_base(self, name: str, base: _Base | None, recorded: str | None, force: bool) -> bool:
        """Compare the model's and the adapter's fingerprints with the library's; True when
        a mismatch was overridden by `force`."""
        manifest = self.manifest
        if manifest is not None:
            expected = manifest.base_fingerprint
            bound = (f"library {self.folder} holds adapters for the base with fingerprint "
                     f"{expected} (model {manifest.model})")
        elif base is not None:
            expected = base.fingerprint
            bound = f"library {self.folder} is new and is being bound to model {base.label} ({expected})"
        elif recorded is not None:
            return False  # the first adapter's recorded base binds the new library
        else:
            raise LibraryError(
                f"library {self.folder} has no base yet and adapter {name!r} records none: pass the "
                "base model (--model M, or model=...) so the library is bound to its fingerprint")
        problems = []
        if base is not None and base.fingerprint != expected:
            problems.append(f"model {base.label} has fingerprint {base.fingerprint}")
        if recorded is not None and recorded != expected:
            problems.append(f"adapter {name!r} was trained on a base with fingerprint {recorded} "
                            "(its training.json)")
        if problems and not force:
            raise BaseMismatchError(
                f"cannot add {name!r}: {bound}, but {'; and '.join(problems)}. Use a library for "
                "that base, or pass --force (force=True) to add it anyway")
        return bool(problems)

    def _check_fits(self, name: str, folder: Path, base: _Base, force: bool) -> bool:
        """Attach the adapter to the base model and take it off again; False when it does not fit
        and `force` lets it in anyway."""
        module = base.loaded()
        probe = f"library-probe-{os.getpid()}"
        try:
            load_adapter(module, folder, probe, activate=False)
        except SpliceError as err:
            if force:
                return False
            raise LibraryError(f"adapter {name!r} ({folder}) does not fit model {base.label}: {err}. "
                               "Use a library for its base, or pass --force to add it anyway") from None
        delete_adapter(module, probe)
        return True

    def _write_entry(self, name: str, fill: Callable[[Path], AdapterSummary], base: _Base | None,
                     recorded: str | None, provenance: str, notes: str, *, source: str,
                     force: bool) -> LibraryEntry:
        with write_lock(self.folder):
            self.adapters_dir.mkdir(exist_ok=True)
            self._discard_leftovers()
            # Checked again under the lock: another process may have bound the library meanwhile.
            if self._check_base(name, base, recorded, force):
                provenance = "forced"
            self._require_free(name)
            self._update_manifest(base, recorded)
            tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=self.adapters_dir))
            try:
                summary = fill(tmp)
                size = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
                entry = LibraryEntry(name=name, method=summary.method, rank=summary.rank,
                                     targets=summary.targets, size_bytes=size, created=now_utc(),
                                     notes=notes, source=source,
                                     base_fingerprint=recorded or (base.fingerprint if base else None),
                                     provenance=provenance, path=self.adapters_dir / name)
                entry.write(tmp)
                _fsync_tree(tmp)
                os.rename(tmp, entry.path)  # the entry appears here, whole
                _fsync_dir(self.adapters_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return entry

    def _update_manifest(self, base: _Base | None, recorded: str | None) -> None:
        """Bind a new library to its base; file a named model's fingerprint in the cache."""
        manifest, changed = self.manifest, False
        if manifest is None:
            manifest, changed = Manifest(base_fingerprint=base.fingerprint if base else recorded,
                                         model=base.label if base else None, created=now_utc()), True
        if base is not None and base.cache_record is not None:
            cache = {**manifest.fingerprint_cache, cache_key(base.label): base.cache_record}
            manifest, changed = replace(manifest, fingerprint_cache=cache), True
        if changed:
            manifest.write(self.folder / MANIFEST_FILE)

    def _require_free(self, name: str) -> None:
        if (self.adapters_dir / name).exists():
            raise EntryExistsError(f"library {self.folder} already has an adapter named {name!r}; "
                                   "choose another name, or remove or rename that one first")

    def _discard_leftovers(self) -> None:
        """Delete the private folders of writes that crashed; call with the lock held."""
        for child in self.adapters_dir.iterdir():
            if child.name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(child, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    """Flush the files, then the folder, so the renamed entry survives a power cut whole."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""The on-disk adapter library: adapters bound to one base model by its weights' fingerprint,
with metadata, a file lock for writers and atomic adds. See `splice.library.library`."""

from splice.library.errors import (BaseMismatchError, EntryExistsError, EntryNotFoundError,
                                   LibraryError, LibraryNameError)
from splice.library.library import AdapterLibrary, check_name
from splice.library.manifest import PROVENANCE, LibraryEntry, Manifest

__all__ = ["AdapterLibrary", "BaseMismatchError", "EntryExistsError", "EntryNotFoundError",
           "LibraryEntry", "LibraryError", "LibraryNameError", "Manifest", "PROVENANCE", "check_name"]

"""Errors of the adapter library; each message names the problem and the fix."""

from __future__ import annotations

from splice.core.errors import SpliceError


class LibraryError(SpliceError):
    """An adapter library operation cannot proceed."""


class LibraryNameError(LibraryError, ValueError):
    """A library entry name that is not a plain adapter name."""


class EntryNotFoundError(LibraryError, LookupError):
    """No adapter of that name in the library."""


class EntryExistsError(LibraryError):
    """The library already holds an adapter of that name."""


class BaseMismatchError(LibraryError):
    """An adapter or model whose base weights differ from the library's base."""

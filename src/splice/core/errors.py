"""Exceptions a user sees: each message names the problem and the fix."""


class SpliceError(Exception):
    """Base class for splice's user-facing errors."""


class TargetError(SpliceError, ValueError):
    """target_modules (or modules_to_save) selects nothing usable in the model."""


class AdapterError(SpliceError, ValueError):
    """An adapter name, state or weight does not fit the model."""


class AdapterFileError(SpliceError, OSError):
    """An adapter folder or file is missing, unsafe or unreadable."""

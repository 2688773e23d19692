"""Why the serving engine refuses a request; the HTTP layer maps each to its status code."""

from __future__ import annotations

from splice.core.errors import SpliceError


class ServingError(SpliceError):
    """A request the engine cannot take."""


class UnknownModelError(ServingError, LookupError):
    """The request names neither the base model nor an adapter of the library (404)."""


class QueueFullError(ServingError):
    """Every waiting place is taken (429, retry later)."""


class ContextLengthError(ServingError, ValueError):
    """The prompt plus max_tokens exceed the model's context length (400)."""


class EngineClosedError(ServingError):
    """The engine has been shut down (503)."""

"""Serving many adapters on one base model: the engine (continuous batching over mixed
adapters), adapter residency, and the OpenAI-compatible HTTP server. See `splice serve`."""

from splice.serving.config import ServeConfig
from splice.serving.engine import Delta, Engine, Failed, Finished, RequestHandle
from splice.serving.errors import (ContextLengthError, EngineClosedError, QueueFullError,
                                   ServingError, UnknownModelError)
from splice.serving.sampling import SamplingParams

__all__ = ["ContextLengthError", "Delta", "Engine", "EngineClosedError", "Failed", "Finished",
           "QueueFullError", "RequestHandle", "SamplingParams", "ServeConfig", "ServingError",
           "UnknownModelError"]

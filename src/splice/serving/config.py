"""`ServeConfig`: the limits of one serving engine (batch width, queue, resident adapters)."""

from __future__ import annotations

from dataclasses import dataclass

from splice.config.base import ConfigError, doc


@dataclass(frozen=True)
class ServeConfig:
    """How many requests decode together, wait, and how many adapters stay attached."""

    max_batch: int = doc(
        "Requests decoded together in one forward per step. Every decode step runs exactly this "
        "many rows (idle rows are padding), so a request's output never depends on how many "
        "others share its step.", default=8)
    max_queue: int = doc(
        "Requests that may wait for a decode slot; one more is refused with 429.", default=64)
    max_resident: int = doc(
        "Adapters kept attached to the model (least recently used ones are detached first; an "
        "adapter in use by a running request is never detached).", default=16)
    retry_after_s: int = doc("The Retry-After a 429 answer suggests, in seconds.", default=1)
    batch_invariant: bool = doc(
        "Pad every decode step to max_batch rows, so that a request's tokens are bit-identical "
        "whoever shares its step. Off, a step runs only its live rows: faster when few "
        "requests are running, but a row's logits may then differ in the last bit with the "
        "batch size, which can flip a greedy token.", default=True)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_resident", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: give a whole number >= 1 "
                                  f"(--{name.replace('_', '-')})")
        if not isinstance(self.batch_invariant, bool):
            raise ConfigError(f"batch_invariant={self.batch_invariant!r} is invalid: give True "
                              "or False (--no-batch-invariant turns it off)")

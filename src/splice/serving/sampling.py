"""Choosing each request's next token, and turning its tokens into text with stop strings.

Sampling follows OpenAI's parameters: temperature T (0 = greedy), nucleus top_p, a seed. Each
request draws from its own `torch.Generator`, so a seeded request samples the same tokens
whatever else is decoded beside it (its logits are the same too, see Note: Batch-invariant
decoding in kvcache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splice.config.base import ConfigError, doc


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates."""

    max_tokens: int = doc("Most tokens to generate.", default=16)
    temperature: float = doc("Softmax temperature; 0 picks the most likely token (greedy).",
                             default=1.0)
    top_p: float = doc("Sample only from the smallest set of tokens whose probability reaches "
                       "top_p (nucleus sampling); 1 keeps every token.", default=1.0)
    stop: tuple[str, ...] = doc("Strings that end the completion (not included in it).",
                                default=())
    seed: int | None = doc("Seed of the request's own random generator; None draws one.",
                           default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens={self.max_tokens!r} is invalid: give an integer >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"temperature={self.temperature!r} is invalid: give a number in "
                              "[0, 2] (0 is greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p!r} is invalid: give a number in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop holds an empty or non-string entry: give non-empty strings")

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item())
        return torch.Generator().manual_seed(seed)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token from one row's logits (vocab,)."""
    if params.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the mass before it is below top_p: the first token always stays
        keep = (sorted_probs.cumsum(0) - sorted_probs) < params.top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TextStream:
    """A request's generated text, released piece by piece: text that might still become the
    start of a stop string, or half a multi-byte character, is held back until it cannot."""

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.sent = 0          # characters released so far
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the newly released text ("" when held back)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            self.text = text[:cut]
            return self._release(len(self.text))
        self.text = text
        hold = max((len(s) - 1 for s in self.stop), default=0)
        safe = len(text) - hold
        while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete character
            safe -= 1
        return self._release(safe)

    def flush(self) -> str:
        """Release whatever was held back (the completion ended without a stop string)."""
        return self._release(len(self.text))

    def _stop_at(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece = self.text[self.sent:upto]
        self.sent = upto
        return piece

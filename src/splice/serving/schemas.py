"""The request bodies of the OpenAI-compatible API, validated by pydantic (a bad field is a 400
that names it), and their translation to `SamplingParams`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from splice.serving.sampling import SamplingParams


class _Body(BaseModel):
    # Fields of OpenAI's API that splice does not use (user, logit_bias, ...) are ignored.
    model_config = ConfigDict(extra="ignore")


class _Generation(_Body):
    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(max_tokens=self.budget(default_max_tokens),
                              temperature=self.temperature, top_p=self.top_p,
                              stop=tuple(s for s in stop if s), seed=self.seed)

    def budget(self, default: int) -> int:
        return self.max_tokens if self.max_tokens is not None else default


class CompletionBody(_Generation):
    prompt: str | list[str] | list[int] = Field(
        description="one prompt: a string, a list holding one string, or token ids")


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def budget(self, default: int) -> int:
        for value in (self.max_completion_tokens, self.max_tokens):
            if value is not None:
                return value
        return default


class AdapterBody(_Body):
    name: str = Field(min_length=1, max_length=100)
    path: str = Field(min_length=1, description="an adapter folder on the server's disk")
    replace: bool = False
    notes: str = ""

"""The serving engine: one scheduler thread owns the model and decodes every running request
together, each with its own adapter and its own KV cache (heterogeneous continuous batching).

    engine = Engine(model, tokenizer, AdapterLibrary("lib/"), ServeConfig(max_batch=8))
    engine.start()
    handle = engine.submit(prompt_ids, "support-bot", SamplingParams(max_tokens=32))
    print(handle.result().text)

Each step of the scheduler: take new requests (a request for an adapter that is not attached
starts its load on the loader thread and waits without holding anyone up), attach adapters whose
files have been read, prefill the waiting requests that fit (each prompt alone, with its
adapter), then run ONE decode forward over all running requests: row i routed to its request's
adapter version (`adapter_routing`), attending over its own cache (kvcache.py). Requests join
and leave the batch between steps. See Note: Batch-invariant decoding in kvcache.py for why a
request's tokens do not depend on its neighbours.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from splice.core.attach import BASE_ADAPTER, list_adapters
from splice.core.routing import adapter_routing
from splice.library import AdapterLibrary
from splice.serving.config import ServeConfig
from splice.serving.errors import (ContextLengthError, EngineClosedError, QueueFullError,
                                   UnknownModelError)
from splice.serving.kvcache import DecodeRows, RequestCache, row_mask, use_row_attention
from splice.serving.metrics import Metrics
from splice.serving.residency import Residency, Version
from splice.serving.sampling import SamplingParams, TextStream, next_token


@dataclass(frozen=True)
class Delta:
    """Newly released text of a request."""
    text: str


@dataclass(frozen=True)
class Finished:
    """A request's end: why, its whole text and token ids, and the token counts."""
    finish_reason: str          # "stop" (end token or stop string), "length" (max_tokens)
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Failed:
    """A request the engine accepted but could not complete (e.g. its adapter failed to load)."""
    message: str


Event = Delta | Finished | Failed


class RequestHandle:
    """What `submit` returns: the request's events, in order, ending with Finished or Failed."""

    def __init__(self, request_id: str, on_event: Callable[[Event], None] | None = None) -> None:
        self.id = request_id
        self._queue: queue.Queue[Event] = queue.Queue()
        self.emit: Callable[[Event], None] = on_event or self._queue.put
        self.cancelled = False

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """The events as they come (only without an `on_event` callback)."""
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if not isinstance(event, Delta):
                return

    def result(self, timeout: float | None = None) -> Finished:
        """Wait for the end; raise RuntimeError if the request failed."""
        for event in self.events(timeout):
            if isinstance(event, Failed):
                raise RuntimeError(event.message)
            if isinstance(event, Finished):
                return event
        raise AssertionError("unreachable")

    def cancel(self) -> None:
        """Stop generating (the client went away); no further events are sent."""
        self.cancelled = True


@dataclass(eq=False)
class _Request:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    model: str
    arrived: float = field(default_factory=time.monotonic)
    version: Version | None = None       # None: the base model
    cache: RequestCache | None = None
    generator: torch.Generator | None = None
    stream: TextStream | None = None
    last_token: int = 0

    @property
    def slot(self) -> str:
        return self.version.slot if self.version is not None else BASE_ADAPTER


class Engine:
    """Serves `model` (which the engine owns from now on: only its thread runs it) with the
    adapters of `library`, under the limits of `config`. `base_name` is the model name that
    selects the base model itself."""

    def __init__(self, model: nn.Module, tokenizer, library: AdapterLibrary | None,
                 config: ServeConfig = ServeConfig(), *, base_name: str = "base") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.base_name = base_name
        self.metrics = Metrics()
        self.residency = Residency(model, library, config.max_resident)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.stop_ids = _stop_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self._cache_kw = ("cache" if "cache" in inspect.signature(model.forward).parameters
                          else "past_key_values")
        use_row_attention(model)
        self._cv = threading.Condition()
        self._incoming: collections.deque[_Request] = collections.deque()
        self._queued = 0                      # incoming + waiting, guarded by _cv
        self._waiting: list[_Request] = []    # scheduler thread only
        self._running: list[_Request] = []
        self._ids = itertools.count()
        self._closed = False
        self._thread: threading.Thread | None = None

    # -- any thread -------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="splice-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.residency.close()

    def models(self) -> list[str]:
        """The names a request may give: the base model, then the library's adapters."""
        return [self.base_name] + self.residency.names()

    def check(self, prompt_tokens: int, model: str, params: SamplingParams) -> None:
        """Raise the error `submit` would raise for these arguments, without queueing."""
        if model != self.base_name and self.residency.entry(model) is None:
            raise UnknownModelError(
                f"the model {model!r} does not exist: give the base model {self.base_name!r} or "
                "an adapter name from the library; GET /v1/models lists them")
        if prompt_tokens < 1:
            raise ContextLengthError("the prompt is empty: give at least one token of prompt")
        if prompt_tokens + params.max_tokens > self.max_context:
            raise ContextLengthError(
                f"the prompt ({prompt_tokens} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceed the model's context length of {self.max_context} tokens; shorten the "
                "prompt or lower max_tokens")

    def submit(self, prompt_ids: list[int], model: str, params: SamplingParams,
               on_event: Callable[[Event], None] | None = None) -> RequestHandle:
        """Queue a request; its events go to `on_event` (called on the scheduler thread, keep
        it quick) or to the handle. Raises UnknownModelError, ContextLengthError, QueueFullError."""
        self.check(len(prompt_ids), model, params)
        handle = RequestHandle(f"cmpl-{next(self._ids)}-{time.time_ns() % 10**9}", on_event)
        with self._cv:
            if self._closed:
                raise EngineClosedError("the server is shutting down; retry on another replica")
            if self._queued >= self.config.max_queue:
                self.metrics.request("rejected")
                raise QueueFullError(f"all {self.config.max_queue} waiting places are taken; "
                                     f"retry in {self.config.retry_after_s} s")
            self._queued += 1
            self._incoming.append(_Request(handle, list(prompt_ids), params, model))
            self._cv.notify()
        return handle

    def queue_depth(self) -> int:
        with self._cv:
            return self._queued

    def running(self) -> int:
        return len(self._running)

    # -- scheduler thread -------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    if self._closed:
                        break
                    if not self._running and not self._incoming and not self._ready_waiting():
                        # idle, or only waiting for adapter files: poll the loads now and then
                        self._cv.wait(timeout=0.005 if self._waiting else 0.5)
                    new = list(self._incoming)
                    self._incoming.clear()
                try:
                    self._step(new)
                except Exception as err:  # a failed forward must not leave clients hanging
                    self._fail_all(f"generation failed: {type(err).__name__}: {err}")
        self._fail_all("the server shut down before the request finished")

    def _fail_all(self, message: str) -> None:
        running, waiting = self._running, self._waiting
        self._running, self._waiting = [], []
        for request in running:
            self._end(request, Failed(message))
        for request in waiting:
            self._dequeue(request, Failed(message))

    def _step(self, new: list[_Request]) -> None:
        for request in new:
            self._accept(request)
        self.residency.attach_loaded()
        self._admit()
        if self._running:
            self._decode()
        self.residency.collect()

    def _ready_waiting(self) -> bool:
        return any(r.version is None or r.version.future is None for r in self._waiting)

    def _accept(self, request: _Request) -> None:
        if request.model != self.base_name:
            try:
                request.version = self.residency.acquire(request.model)
            except LookupError:  # removed from the library after submit
                self._dequeue(request, Failed(f"adapter {request.model!r} was removed from the "
                                              "library; GET /v1/models lists the adapters"))
                return
        self._waiting.append(request)

    def _admit(self) -> None:
        """Prefill waiting requests whose adapter is attached, while decode rows are free."""
        for request in list(self._waiting):
            if len(self._running) >= self.config.max_batch:
                return
            version = request.version
            if version is not None and version.error is not None:
                self._waiting.remove(request)
                self._dequeue(request, Failed(version.error))
            elif request.handle.cancelled:
                self._waiting.remove(request)
                self._dequeue(request, None)
            elif version is None or version.ready:
                self._waiting.remove(request)
                with self._cv:
                    self._queued -= 1
                self._prefill(request)

    def _dequeue(self, request: _Request, event: Event | None) -> None:
        with self._cv:
            self._queued -= 1
        self._end(request, event)

    def _prefill(self, request: _Request) -> None:
        ids = torch.tensor([request.prompt_ids], device=self.device)          # (1, T)
        with self._routing([request.slot]):
            out = self.model(ids, use_cache=True, logits_to_keep=1)
        cache = out.cache if self._cache_kw == "cache" else out.past_key_values
        request.cache = RequestCache.from_prefill(
            cache, capacity=len(request.prompt_ids) + request.params.max_tokens)
        request.generator = request.params.generator()
        request.stream = TextStream(self.tokenizer, request.params.stop)
        self._running.append(request)
        self._advance(request, out.logits[0, -1])                             # (vocab,)
        self.metrics.generated(1)

    def _decode(self) -> None:
        """One forward over every running request: max_batch rows, idle ones padding (see
        Note: Batch-invariant decoding)."""
        rows = list(self._running)
        pad = self.config.max_batch - len(rows) if self.config.batch_invariant else 0
        tokens = torch.tensor([[r.last_token] for r in rows] + [[0]] * pad,
                              device=self.device)                              # (W, 1)
        lengths = [r.cache.length for r in rows] + [0] * pad
        slots = [r.slot for r in rows] + [BASE_ADAPTER] * pad
        with self._routing(slots):
            positions = torch.tensor(lengths, device=self.device)[:, None]    # (W, 1)
            logits = self.model(tokens, position_ids=positions, use_cache=False,
                                attention_mask=row_mask(len(lengths), self.device),
                                splice_rows=DecodeRows([r.cache for r in rows] + [None] * pad,
                                                       lengths)).logits[:, -1]   # (W, vocab)
        for i, request in enumerate(rows):
            request.cache.length += 1
            self._advance(request, logits[i])
        self.metrics.generated(len(rows))

    def _advance(self, request: _Request, logits: torch.Tensor) -> None:
        """Choose the request's next token from its logits (vocab,); emit text; end it when
        done."""
        if request.handle.cancelled:
            self._finish(request, None)
            return
        token = next_token(logits, request.params, request.generator)
        stream = request.stream
        if token in self.stop_ids:
            self._finish(request, "stop")
            return
        request.last_token = token
        piece = stream.push(token)
        if piece:
            request.handle.emit(Delta(piece))
        if stream.stopped:
            self._finish(request, "stop")
        elif len(stream.ids) >= request.params.max_tokens:
            self._finish(request, "length")

    def _finish(self, request: _Request, reason: str | None) -> None:
        self._running.remove(request)
        event = None
        if reason is not None:
            piece = request.stream.flush() if reason == "length" else ""
            if piece:
                request.handle.emit(Delta(piece))
            event = Finished(reason, request.stream.text, tuple(request.stream.ids),
                             len(request.prompt_ids))
            self.metrics.finished(len(request.prompt_ids), time.monotonic() - request.arrived)
        self._end(request, event)

    def _end(self, request: _Request, event: Event | None) -> None:
        request.cache = None
        if request.version is not None:
            self.residency.release(request.version)
            request.version = None
        self.metrics.request("cancelled" if event is None else
                             "ok" if isinstance(event, Finished) else "error")
        if event is not None:
            request.handle.emit(event)

    def _routing(self, slots: list[str]) -> contextlib.AbstractContextManager:
        # with no adapter attached every row is on the base, which a plain forward computes
        return (adapter_routing(self.model, slots) if list_adapters(self.model)
                else contextlib.nullcontext())


def _stop_ids(model: nn.Module, tokenizer) -> set[int]:
    """Token ids that end a completion: the model's and the tokenizer's end-of-sequence ids."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return set(ids)

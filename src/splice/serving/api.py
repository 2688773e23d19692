"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

    POST /v1/completions, POST /v1/chat/completions   "model": the base's name or an adapter's
    GET  /v1/models                                   the base and the library's adapters
    POST /v1/adapters, DELETE /v1/adapters/{name}     add a folder to the library / remove one
    GET  /health, GET /metrics                        liveness; Prometheus text

Errors use OpenAI's body, {"error": {"message", "type", "param", "code"}}: 400 for a malformed
body or a bad field (named), or a prompt over the context length; 401 without the API key (when
one is set); 404 for an unknown model, naming GET /v1/models; 429 with Retry-After when the
queue is full. `"stream": true` answers with server-sent events in OpenAI's chunk format,
closed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from splice.config.base import ConfigError
from splice.library import EntryExistsError, LibraryError, LibraryNameError, check_name
from splice.serving.engine import Delta, Engine, Event, Failed, Finished
from splice.serving.errors import (ContextLengthError, EngineClosedError, QueueFullError,
                                   UnknownModelError)
from splice.serving.schemas import AdapterBody, ChatBody, CompletionBody
from splice.serving.sampling import SamplingParams

COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status, headers=headers)


def create_app(engine: Engine, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` (started and closed by the caller)."""
    app = FastAPI(title="splice", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    admin_lock = threading.Lock()
    created = int(time.time())

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), api_key):
            raise ApiError(401, "missing or wrong API key: send the header "
                           "'Authorization: Bearer <key>' with the server's --api-key",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    install_error_handlers(app, engine)
    guarded = [Depends(authorize)]

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": engine.base_name,
                "adapters_resident": engine.residency.resident()}

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=guarded)
    def metrics() -> PlainTextResponse:
        gauges = {
            "splice_queue_depth": ("Requests waiting for a decode slot.", engine.queue_depth()),
            "splice_running_requests": ("Requests decoding now.", engine.running()),
            "splice_adapters_resident": ("Adapter versions attached to the model.",
                                         engine.residency.resident()),
            "splice_batch_width": ("Rows of each decode step.", engine.config.max_batch),
        }
        return PlainTextResponse(engine.metrics.render(gauges),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    def models() -> dict:
        data = [{"id": engine.base_name, "object": "model", "created": created,
                 "owned_by": "splice", "root": engine.base_name, "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "splice",
                  "root": engine.base_name, "parent": engine.base_name}
                 for name in engine.residency.names()]
        return {"object": "list", "data": data}

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionBody, request: Request):
        ids = prompt_ids(engine, body.prompt)
        params = sampling(body, COMPLETION_MAX_TOKENS)
        return await answer(request, engine, body.model, ids, params, body.stream, chat=False)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatBody, request: Request):
        ids = chat_ids(engine, body)
        params = sampling(body, CHAT_MAX_TOKENS)
        return await answer(request, engine, body.model, ids, params, body.stream, chat=True)

    @app.post("/v1/adapters", status_code=201, dependencies=guarded)
    def add_adapter(body: AdapterBody) -> dict:
        with admin_lock:
            entry = add_to_library(engine, body)
        return {"id": entry.name, "object": "model", "owned_by": "splice",
                "parent": engine.base_name, "method": entry.method, "rank": entry.rank,
                "created": entry.created, "size_bytes": entry.size_bytes}

    @app.delete("/v1/adapters/{name}", dependencies=guarded)
    def delete_adapter(name: str) -> dict:
        with admin_lock:
            entry = engine.residency.entry(name)
            if entry is None:
                raise unknown_model(engine, name)
            engine.residency.library.remove(entry.name)
            engine.residency.refresh()
            engine.residency.retire(entry.name)
        return {"id": entry.name, "object": "model", "deleted": True}

    return app


def install_error_handlers(app: FastAPI, engine: Engine) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON "
                                  f"({first.get('ctx', {}).get('error', 'malformed')}); send "
                                  "a JSON object", code="invalid_json")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        return error_response(400, f"invalid field {where!r}: {first.get('msg', 'invalid value')}",
                              param=loc[0] if loc else None, code="invalid_value")

    @app.exception_handler(UnknownModelError)
    async def unknown(_: Request, err: UnknownModelError) -> JSONResponse:
        return error_response(404, str(err), "model", "model_not_found")

    @app.exception_handler(ContextLengthError)
    async def too_long(_: Request, err: ContextLengthError) -> JSONResponse:
        return error_response(400, str(err), "messages", "context_length_exceeded")

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, err: QueueFullError) -> JSONResponse:
        return error_response(429, str(err), None, "queue_full",
                              {"Retry-After": str(engine.config.retry_after_s)})

    @app.exception_handler(EngineClosedError)
    async def closed(_: Request, err: EngineClosedError) -> JSONResponse:
        return error_response(503, str(err), None, "shutting_down")


def unknown_model(engine: Engine, name: str) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist: give the base model "
                    f"{engine.base_name!r} or an adapter name from the library; GET /v1/models "
                    "lists them", param="model", code="model_not_found")


def sampling(body: CompletionBody | ChatBody, default_max_tokens: int) -> SamplingParams:
    try:
        return body.sampling(default_max_tokens)
    except ConfigError as err:
        field = str(err).split("=", 1)[0] if "=" in str(err) else "stop"
        raise ApiError(400, str(err), param=field, code="invalid_value") from None


def prompt_ids(engine: Engine, prompt: str | list[str] | list[int]) -> list[int]:
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        vocab = engine.model.config.vocab_size
        if any(not 0 <= p < vocab for p in prompt):
            raise ApiError(400, f"invalid field 'prompt': token ids must lie in [0, {vocab})",
                           param="prompt", code="invalid_value")
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "invalid field 'prompt': give one prompt per request (a string), "
                           f"not a list of {len(prompt)}", param="prompt", code="invalid_value")
        prompt = prompt[0]
    return engine.tokenizer.encode(prompt, add_special_tokens=False)


def chat_ids(engine: Engine, body: ChatBody) -> list[int]:
    tokenizer = engine.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        raise ApiError(400, f"the model {engine.base_name!r} has no chat template; use "
                       "POST /v1/completions with a plain prompt", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


async def answer(request: Request, engine: Engine, model: str, ids: list[int],
                 params: SamplingParams, stream: bool, *, chat: bool):
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    handle = engine.submit(ids, model, params, on_event=deliver)
    shape = Shape(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", model, chat)
    if stream:
        return StreamingResponse(sse(events, handle, shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        while True:
            event = await events.get()
            if isinstance(event, Failed):
                return error_response(500, event.message, code="generation_failed")
            if isinstance(event, Finished):
                return shape.whole(event)
    finally:
        handle.cancel()  # no effect once finished; stops the work when the client went away


class Shape:
    """The JSON bodies of one response, in the completion or the chat format."""

    def __init__(self, response_id: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat = response_id, model, chat
        self.created = int(time.time())

    def _frame(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice}]}

    def whole(self, done: Finished) -> dict[str, Any]:
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                 "total_tokens": done.prompt_tokens + done.completion_tokens}
        if self.chat:
            choice = {"message": {"role": "assistant", "content": done.text},
                      "finish_reason": done.finish_reason}
            return {**self._frame("chat.completion", choice), "usage": usage}
        choice = {"text": done.text, "logprobs": None, "finish_reason": done.finish_reason}
        return {**self._frame("text_completion", choice), "usage": usage}

    def chunk(self, text: str | None, finish_reason: str | None, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else (
                {"content": text} if text is not None else {})
            body = self._frame("chat.completion.chunk",
                               {"delta": delta, "finish_reason": finish_reason})
        else:
            body = self._frame("text_completion", {"text": text or "", "logprobs": None,
                                                   "finish_reason": finish_reason})
        return f"data: {json.dumps(body)}\n\n"


async def sse(events: asyncio.Queue, handle, shape: Shape) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield shape.chunk(None, None, first=True)
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield shape.chunk(event.text, None)
            elif isinstance(event, Finished):
                yield shape.chunk(None, event.finish_reason)
                break
            else:
                body = {"error": {"message": event.message, "type": "server_error",
                                  "param": None, "code": "generation_failed"}}
                yield f"data: {json.dumps(body)}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()


def add_to_library(engine: Engine, body: AdapterBody):
    """Add the folder `body.path` as `body.name`; with `replace`, swap it in for the entry of
    that name (requests running on the old one finish on it)."""
    library = engine.residency.library
    try:
        check_name(body.name)
    except LibraryNameError as err:
        raise ApiError(400, str(err), param="name", code="invalid_value") from None
    try:
        exists = engine.residency.entry(body.name) is not None
        if exists and not body.replace:
            raise ApiError(409, f"the library already has an adapter named {body.name!r}; pass "
                           '"replace": true to swap it, or DELETE /v1/adapters/{name} first',
                           param="name", code="adapter_exists")
        if not exists:
            entry = library.add(body.name, body.path, notes=body.notes)
        else:
            # Added under a private name first: a bad folder leaves the old entry in place.
            incoming = f"incoming-{uuid.uuid4().hex[:16]}"
            library.add(incoming, body.path, notes=body.notes)
            library.remove(body.name)
            entry = library.rename(incoming, body.name)
    except EntryExistsError as err:
        raise ApiError(409, str(err), param="name", code="adapter_exists") from None
    except (LibraryError, OSError, ValueError) as err:
        raise ApiError(400, f"cannot add the adapter: {err}", param="path",
                       code="invalid_adapter") from None
    engine.residency.refresh()
    engine.residency.retire(body.name)
    return entry

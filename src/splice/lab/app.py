"""The lab's ASGI app: the page's static files and one small JSON API per panel.

    app = create_app(model, tokenizer, library="adapters/")
    uvicorn.run(app, host="127.0.0.1", port=8765)

Every number the page shows comes from these endpoints, and every endpoint returns what a
splice function computed: `parameter_report` (Rank), the memory planner (Memory), a live
training run (Train), the adapter library, merging and composition (Library), and the method
registry (Family). The page loads nothing from the network.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from torch import nn

from splice.config.base import ConfigError
from splice.core.errors import SpliceError
from splice.core.registry import method_table
from splice.lab.bench import DEFAULT_PROMPT, LibraryBench
from splice.lab.memory import MemoryPanel
from splice.lab.rank import MAX_RANK, RankPanel
from splice.lab.training import TrainSession, TrainSettings
from splice.library import AdapterLibrary

STATIC = Path(__file__).parent / "static"
POLL_S = 0.1          # how often an event stream looks for new training events
KEEPALIVE_S = 10.0    # a comment line this often keeps an idle stream open through proxies


class MergeRequest(BaseModel):
    name: str


class BlendRequest(BaseModel):
    names: list[str]
    weights: list[float]


class AnswerRequest(BaseModel):
    prompt: str = DEFAULT_PROMPT


def create_app(model: nn.Module, tokenizer, library: AdapterLibrary | str | os.PathLike | None = None,
               *, model_name: str | None = None,
               train_settings: TrainSettings = TrainSettings()) -> FastAPI:
    """The lab for a resident `model`: the Library panel merges into it (one thing at a time),
    the Train panel trains a copy of it, the Rank and Memory panels count on its architecture."""
    if library is not None and not isinstance(library, AdapterLibrary):
        library = AdapterLibrary(library)
    name = model_name or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
    counts = RankPanel(model)
    memory = MemoryPanel(counts.skeleton, name)
    session = TrainSession(model, tokenizer, train_settings)
    bench = LibraryBench(model, tokenizer, library)

    app = FastAPI(title="splice lab", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.counts, app.state.memory, app.state.session, app.state.bench = counts, memory, session, bench
    app.add_exception_handler(SpliceError, _bad_request)
    app.add_exception_handler(ConfigError, _bad_request)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        return {"model": name, "targets": counts.choices, "max_rank": MAX_RANK,
                "memory": memory.options(), "train": asdict(train_settings),
                "prompt": DEFAULT_PROMPT, "library": bench.state()["folder"]}

    @app.get("/api/family")
    def family() -> list[dict[str, str]]:
        return method_table()

    for router in (counting_routes(counts, memory), training_routes(session), library_routes(bench)):
        app.include_router(router, prefix="/api")
    return app


def counting_routes(counts: RankPanel, memory: MemoryPanel) -> APIRouter:
    router = APIRouter()

    @router.get("/rank")
    def rank_report(rank: int = 8, targets: str = "all-linear") -> dict[str, Any]:
        chosen: list[str] | str = targets if targets == "all-linear" else [
            t for t in targets.split(",") if t]
        return asdict(counts.report(rank, chosen))

    @router.get("/memory")
    def memory_plan(request: Request) -> dict[str, Any]:
        return memory.plan(dict(request.query_params))

    return router


def training_routes(session: TrainSession) -> APIRouter:
    router = APIRouter(prefix="/train")
    router.post("/play")(session.play)
    router.post("/pause")(session.pause)
    router.post("/stop")(session.stop)
    router.get("/status")(session.status)

    @router.get("/events")
    def events() -> StreamingResponse:
        return StreamingResponse(_event_stream(session), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return router


def library_routes(bench: LibraryBench) -> APIRouter:
    router = APIRouter(prefix="/library")
    router.get("")(bench.state)
    router.post("/unmerge")(bench.unmerge)

    @router.post("/merge")
    def merge(body: MergeRequest) -> dict[str, Any]:
        return bench.merge(body.name)

    @router.post("/blend")
    def blend(body: BlendRequest) -> dict[str, Any]:
        return bench.blend(body.names, body.weights)

    @router.post("/answer")
    def answer(body: AnswerRequest) -> dict[str, Any]:
        return bench.answer(body.prompt)

    return router


async def _event_stream(session: TrainSession) -> AsyncIterator[str]:
    """The current run's events from its first, as server-sent events, then an `end` event."""
    run = session.status()["run"]
    sent, idle = 0, 0.0
    while True:
        events, over = session.events_since(run, sent)
        for event in events:
            yield f"event: step\ndata: {json.dumps(event)}\n\n"
        sent += len(events)
        if over:
            events, _ = session.events_since(run, sent)  # what came between the two reads
            for event in events:
                yield f"event: step\ndata: {json.dumps(event)}\n\n"
            yield f"event: end\ndata: {json.dumps(session.status())}\n\n"
            return
        idle = 0.0 if events else idle + POLL_S
        if idle >= KEEPALIVE_S:
            idle = 0.0
            yield ": keepalive\n\n"
        await asyncio.sleep(POLL_S)


def _bad_request(request: Request, err: Exception) -> JSONResponse:
    return JSONResponse({"error": str(err)}, status_code=400)


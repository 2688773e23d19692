"""Running the HTTP server: from a model name and a library folder (`splice serve`), or in a
background thread on a free loopback port (tests, benchmarks)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from splice.library import AdapterLibrary, BaseMismatchError
from splice.library.fingerprints import resident_fingerprint
from splice.models import load_model
from splice.serving.api import create_app
from splice.serving.config import ServeConfig
from splice.serving.engine import Engine


def build_engine(model_name: str | os.PathLike, library_dir: str | os.PathLike, config: ServeConfig, *,
                 force: bool = False) -> Engine:
    """Load the base model and open the library (checked to hold adapters for this base)."""
    model, tokenizer = load_model(model_name)
    library = AdapterLibrary(library_dir)
    expected = library.base_fingerprint
    if expected is not None and not force:
        actual = resident_fingerprint(model)
        if actual != expected:
            raise BaseMismatchError(
                f"library {Path(library_dir)} holds adapters for the base with fingerprint "
                f"{expected}, but model {model_name} has fingerprint {actual}: serve that base, "
                "or pass --force to serve anyway")
    return Engine(model, tokenizer, library, config, base_name=os.fspath(model_name))


def serve(model_name: str, library_dir: str | os.PathLike, *, host: str = "127.0.0.1",
          port: int = 8000, config: ServeConfig = ServeConfig(), api_key: str | None = None,
          force: bool = False) -> None:
    """Serve until interrupted."""
    engine = build_engine(model_name, library_dir, config, force=force).start()
    try:
        uvicorn.run(create_app(engine, api_key=api_key), host=host, port=port, log_level="info")
    finally:
        engine.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving `app` on loopback in a daemon thread: `with ServerThread(app) as s:`
    then talk to `s.url`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(uvicorn.Config(app, host=self.host, port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="splice-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

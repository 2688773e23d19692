"""Serving the lab on the loopback interface: in the foreground (`splice lab`) or in a
background thread (tests, scripted screenshots)."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import webbrowser
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from splice.lab.app import create_app
from splice.library import AdapterLibrary
from splice.models import load_model

HOST = "127.0.0.1"  # the lab trains and merges on request: never listen beyond this machine
# Open event streams would hold a graceful shutdown for as long as they stay open.
SHUTDOWN_S = 1


def serve_lab(model_name: str, library: str | os.PathLike | None = None, *, port: int = 8765,
              open_browser: bool = True) -> None:
    """Load `model_name`, open `library`, and serve the lab at http://127.0.0.1:port until Ctrl-C."""
    if library is not None and not (Path(library) / "library.json").is_file():
        raise FileNotFoundError(f"--library {library}: no library.json there; create a library "
                                "with `splice library add` first, or leave --library out")
    print(f"splice lab: loading {model_name}", file=sys.stderr, flush=True)
    model, tokenizer = load_model(model_name)
    if tokenizer is None:
        raise FileNotFoundError(f"model {model_name} has no tokenizer; the lab answers and trains "
                                "on text, so give a model folder with tokenizer files")
    app = create_app(model, tokenizer, AdapterLibrary(library) if library else None,
                     model_name=model_name)
    url = f"http://{HOST}:{port}/"
    print(f"splice lab: serving {url} (Ctrl-C stops)", file=sys.stderr, flush=True)
    if open_browser:
        threading.Timer(1.0, webbrowser.open, args=(url,)).start()
    uvicorn.run(app, host=HOST, port=port, log_level="warning",
                timeout_graceful_shutdown=SHUTDOWN_S)


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves `app` on a free loopback port in a thread."""

    def __init__(self, app: FastAPI, startup_timeout_s: float = 30.0) -> None:
        self.app, self.startup_timeout_s = app, startup_timeout_s
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    def __enter__(self) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_S)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="splice-lab-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the lab server did not start")
            time.sleep(0.02)
        return f"http://{HOST}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

"""`splice serve`: an OpenAI-compatible HTTP server for a base model and its adapter library."""

from __future__ import annotations

import argparse

from splice.config.base import help_for
from splice.serving.config import ServeConfig
from splice.serving.server import serve

NAME = "serve"
HELP = "serve the base model and a library of adapters over an OpenAI-compatible HTTP API"
DESCRIPTION = ("Serve a base model and every adapter of a library at once: a request's \"model\" "
               "is an adapter name (or the base model's name), and requests for different "
               "adapters decode together in one batch. Endpoints: POST /v1/completions, "
               "POST /v1/chat/completions (with \"stream\": true for server-sent events), "
               "GET /v1/models, POST /v1/adapters, DELETE /v1/adapters/{name}, GET /health, "
               "GET /metrics (Prometheus text).")
EPILOG = """examples:
  splice serve --model smollm2-135m --library adapters/
  splice serve --model smollm2-135m --library adapters/ --port 8080 --max-batch 16 \\
      --max-resident 32 --api-key "$SPLICE_API_KEY"
then, e.g.:
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "support-bot", "messages": [{"role": "user", "content": "Hi"}]}'
On a CPU shared with other work, start it with OMP_WAIT_POLICY=PASSIVE: threads that spin
between decode steps made each step ~25x slower on a busy 2-core machine."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="the base model: a bundled name (smollm2-135m) or a local folder")
    parser.add_argument("--library", required=True, help="the adapter library folder")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="the port (default 8000)")
    for name in ("max_batch", "max_queue", "max_resident"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            default=getattr(ServeConfig(), name),
                            help=help_for(ServeConfig, name))
    parser.add_argument("--no-batch-invariant", dest="batch_invariant", action="store_false",
                        help="decode only the live rows each step (faster at low load; a "
                        "request's tokens may then depend on its neighbours in the last bit)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every request but /health")
    parser.add_argument("--force", action="store_true",
                        help="serve even if the library was made for another base model")


def run(args: argparse.Namespace) -> int:
    config = ServeConfig(max_batch=args.max_batch, max_queue=args.max_queue,
                         max_resident=args.max_resident, batch_invariant=args.batch_invariant)
    serve(args.model, args.library, host=args.host, port=args.port, config=config,
          api_key=args.api_key, force=args.force)
    return 0

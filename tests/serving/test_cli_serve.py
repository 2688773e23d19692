"""`splice serve`: flags reach the server, and a library made for another base is refused."""

from __future__ import annotations

import pytest
import torch

from serving_helpers import tiny_chat_llama
from splice.cli import serve as serve_command
from splice.cli.main import build_parser
from splice.library import BaseMismatchError
from splice.serving import ServeConfig
from splice.serving.server import build_engine


def test_flags_reach_the_server(monkeypatch):
    seen = {}
    monkeypatch.setattr(serve_command, "serve", lambda *a, **k: seen.update(args=a, **k))
    args = build_parser().parse_args(
        ["serve", "--model", "m", "--library", "lib", "--port", "9001", "--max-batch", "3",
         "--max-queue", "5", "--max-resident", "2", "--api-key", "k"])
    assert args.run(args) == 0
    assert seen["args"] == ("m", "lib")
    assert seen["port"] == 9001 and seen["host"] == "127.0.0.1" and seen["api_key"] == "k"
    assert seen["config"] == ServeConfig(max_batch=3, max_queue=5, max_resident=2)
    args = build_parser().parse_args(["serve", "--model", "m", "--library", "lib",
                                      "--no-batch-invariant"])
    args.run(args)
    assert seen["config"] == ServeConfig(batch_invariant=False)


def test_a_bad_limit_names_its_flag():
    args = build_parser().parse_args(["serve", "--model", "m", "--library", "l",
                                      "--max-batch", "0"])
    with pytest.raises(ValueError, match="--max-batch"):
        args.run(args)


def test_the_library_must_match_the_served_base(library, tokenizer, tmp_path):
    folder = tmp_path / "model"
    model = tiny_chat_llama(tokenizer)              # the base the library was bound to
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    engine = build_engine(folder, library.folder, ServeConfig())
    assert engine.models() == [str(folder), "a", "b", "c"]
    engine.close()

    with torch.no_grad():
        model.model.norm.weight.add_(1.0)           # another base
    model.save_pretrained(folder)
    with pytest.raises(BaseMismatchError, match="--force"):
        build_engine(folder, library.folder, ServeConfig())
    build_engine(folder, library.folder, ServeConfig(), force=True).close()

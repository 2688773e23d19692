"""`splice lab` serves the page for a model folder and a library on 127.0.0.1."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

import splice
from splice.cli.main import build_parser
from splice.core.report import parameter_report

from lab_helpers import tiny_base


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # a fresh interpreter imports torch and transformers
def test_lab_command_serves_the_page_and_its_numbers(tmp_path, tokenizer, library_dir):
    model = tiny_base(len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "splice.cli.main", "lab", "--model", str(tmp_path / "model"),
         "--library", str(library_dir), "--port", str(port), "--no-browser"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                page = httpx.get(url + "/")
                break
            except httpx.ConnectError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "splice lab did not start serving"
                time.sleep(0.2)
        assert page.status_code == 200 and "splice lab" in page.text
        assert httpx.get(url + "/static/app.js").status_code == 200
        counts = httpx.get(url + "/api/rank", params={"rank": 16, "targets": "all-linear"}).json()
        expected = parameter_report(model, splice.LoRAConfig(rank=16, target_modules="all-linear"))
        assert counts["adapter_params"] == expected.adapter_params
        assert [e["name"] for e in httpx.get(url + "/api/library").json()["entries"]] == ["formal", "terse"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_lab_is_a_subcommand_with_its_flags():
    args = build_parser().parse_args(["lab", "--model", "m", "--library", "lib", "--port", "9000",
                                      "--no-browser"])
    assert (args.model, args.library, args.port, args.no_browser) == ("m", "lib", 9000, True)

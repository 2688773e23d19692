"""Every code block in docs/**/*.md and README.md runs (see doc_snippets.py for the rules).

One test per page: a page's python blocks share a namespace and its blocks a working directory,
in page order. A page whose blocks load a bundled model (SmolLM2) is marked integration. README.md runs
its python blocks only: its shell blocks are `make` targets and minutes-long SmolLM2 runs,
which have their own tests (tests/cli, tests/integration), and it carries no test directives.
New pages under docs/ are picked up with no change here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splice.cli.main import main as cli_main

from doc_snippets import RUN_LANGS, SnippetError, extract_blocks, relative_links, run_page
from doc_tiny_model import save_tiny_chat_model

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
README = ROOT / "README.md"
# README: python only (see the module docstring)
LANGUAGES = {README: {"python"}}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def page_params() -> list:
    params = []
    for path in [*PAGES, README]:
        try:
            blocks = extract_blocks(path.read_text(), rel(path))
        except SnippetError:  # a malformed page: its test reports the error, naming file:line
            blocks = []
        langs = LANGUAGES.get(path, RUN_LANGS)
        real = any(b.needs_real_model and b.lang in langs for b in blocks)
        marks = [pytest.mark.integration] if real else []
        params.append(pytest.param(path, id=rel(path), marks=marks))
    return params


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory) -> str:
    return str(save_tiny_chat_model(tmp_path_factory.mktemp("tiny-doc-model")))


@pytest.fixture
def one_thread():
    """The examples run on tiny models, where a second thread buys nothing and, on a busy
    2-core machine, costs up to 10x in synchronisation waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", page_params())
def test_page_code_blocks_run(path: Path, tiny_model_folder, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    failure = None
    try:
        blocks = extract_blocks(path.read_text(), rel(path))
        run_page(blocks, cli_main=cli_main, tiny_model=tiny_model_folder,
                 languages=LANGUAGES.get(path, RUN_LANGS))
    except SnippetError as err:  # the message names file:line; the harness frames add nothing
        failure = str(err)
    if failure:
        pytest.fail(failure, pytrace=False)


def test_docs_exist_and_index_links_every_page():
    assert (DOCS / "index.md").is_file()
    index = (DOCS / "index.md").read_text()
    linked = {(DOCS / target).resolve() for _, target in relative_links(index)}
    unlisted = [rel(p) for p in PAGES if p.name != "index.md" and p.resolve() not in linked]
    assert not unlisted, f"docs/index.md does not link {unlisted}"


@pytest.mark.parametrize("path", PAGES, ids=rel)
def test_relative_links_resolve(path: Path):
    broken = [f"{rel(path)}:{line}: {target}" for line, target in relative_links(path.read_text())
              if not (path.parent / target).exists()]
    assert not broken, "broken links:\n" + "\n".join(broken)

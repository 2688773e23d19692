"""Extract the code blocks of a Markdown page and run them, reporting failures as `file:line`.

What runs (every fenced block, by its language):

    python   in one namespace per page, in page order, so a page can build an example up.
             A block that starts with `>>>` is a doctest: its printed output is checked.
    sh/bash  every command must be a `splice ...` command (continuation lines with a trailing
             backslash, `#` comments allowed); each runs in-process through the CLI entry point
             and must exit 0.
    json     must parse.
    other    (text, yaml, output listings) is shown, not run.

A directive in an HTML comment on the line(s) just before a block changes how it runs; it is
invisible in the rendered page:

    <!-- test: skip=<why> -->        do not run this block; the reason is required
    <!-- test: model=tiny -->        replace `smollm2-135m` with a tiny random chat model folder
                                     (tests/docs/doc_tiny_model.py), for examples that would
                                     train or load the real model for too long
    <!-- test: integration -->       this block loads the real SmolLM2 on purpose (the page's
                                     test is then marked integration); implied by a run block
                                     that names a bundled model (`smollm2-135m` without
                                     model=tiny, `minilm-l6`)
    <!-- test: output -->            (on a text block) what the shell block just before it
                                     printed: its lines, whitespace collapsed, must appear in
                                     that output in order. Only for commands that ran as written
                                     (not with model=tiny), so pasted output stays true

Several directives go in one comment, separated by `;`. Blocks run in a fresh temporary working
directory per page, shared by the page's blocks (a CLI block can read what an earlier one wrote).
"""

from __future__ import annotations

import contextlib
import doctest
import io
import json
import re
import shlex
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

REAL_MODEL = "smollm2-135m"
#: bundled model names: a block that names one loads a real model (integration)
BUNDLED_MODELS = (REAL_MODEL, "minilm-l6")
RUN_LANGS = {"python", "sh", "bash", "json"}
SHELL_LANGS = {"sh", "bash"}
KNOWN_DIRECTIVES = {"skip", "model", "integration", "output"}

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*test:(?P<body>.*?)-->\s*$")


class SnippetError(Exception):
    """A page's block failed or is malformed; the message starts with `file:line:`."""


@dataclass(frozen=True)
class Block:
    """One fenced code block. `line` is the 1-based line of its first code line."""

    path: str
    line: int
    lang: str
    code: str
    directives: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def runs(self) -> bool:
        if "skip" in self.directives:
            return False
        return self.lang in RUN_LANGS or "output" in self.directives

    @property
    def needs_real_model(self) -> bool:
        """Whether running this block loads a bundled model (its page test is then integration)."""
        if not self.runs or "output" in self.directives:
            return False
        if "integration" in self.directives:
            return True
        code = self.code
        if self.directives.get("model") == "tiny":
            code = code.replace(REAL_MODEL, "")
        return any(name in code for name in BUNDLED_MODELS)


def parse_directives(body: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(";"))):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key not in KNOWN_DIRECTIVES:
            raise SnippetError(f"{where}: unknown test directive {key!r}; use one of "
                               f"{', '.join(sorted(KNOWN_DIRECTIVES))}")
        if key == "skip" and not value:
            raise SnippetError(f"{where}: 'skip' needs a reason: <!-- test: skip=<why> -->")
        if key == "model" and value != "tiny":
            raise SnippetError(f"{where}: model={value!r}: the only substitute is model=tiny")
        out[key] = value
    return out


def extract_blocks(text: str, path: str) -> list[Block]:
    """Every fenced block of a Markdown text, with the directives written just before it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: dict[str, str] = {}
    pending_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = DIRECTIVE.match(line)
        fence = FENCE.match(line)
        if directive:
            pending.update(parse_directives(directive.group("body"), f"{path}:{i + 1}"))
            pending_line = i + 1
        elif fence:
            marker, info = fence.group("fence"), fence.group("info").strip()
            lang = info.split()[0].lower() if info else ""
            start = i + 1
            i += 1
            body: list[str] = []
            while i < len(lines) and not lines[i].strip().startswith(marker):
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise SnippetError(f"{path}:{start}: code block is never closed")
            indent = len(fence.group("indent"))
            code = "\n".join(b[indent:] if b[:indent].isspace() else b for b in body)
            blocks.append(Block(path, start + 1, lang, code + "\n", pending))
            pending = {}
        elif line.strip() and pending:
            raise SnippetError(f"{path}:{pending_line}: a test directive must be followed by a "
                               "code block (blank lines may come between)")
        i += 1
    if pending:
        raise SnippetError(f"{path}:{pending_line}: a test directive at the end of the page "
                           "applies to no code block")
    return blocks


def substitute_model(block: Block, tiny_model: str | None) -> str:
    if block.directives.get("model") != "tiny":
        return block.code
    if tiny_model is None:
        raise SnippetError(f"{block.where}: model=tiny but no tiny model folder was given")
    if REAL_MODEL not in block.code:
        raise SnippetError(f"{block.where}: model=tiny, but the block never names {REAL_MODEL}")
    return block.code.replace(REAL_MODEL, tiny_model)


# -- shell blocks: `splice ...` commands through the CLI entry point ---------------------------
def shell_commands(block: Block, code: str) -> list[tuple[int, list[str]]]:
    """(line, argv after `splice`) for each command of a shell block."""
    commands: list[tuple[int, list[str]]] = []
    lines = code.splitlines()
    i = 0
    while i < len(lines):
        start = i
        text = lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i]
        i += 1
        argv = shlex.split(text, comments=True)
        if not argv:
            continue
        if argv[0] != "splice":
            raise SnippetError(
                f"{block.path}:{block.line + start}: only `splice ...` commands run in a shell "
                f"block, not {argv[0]!r}; mark the block <!-- test: skip=<why> --> if it cannot "
                "run")
        if any(tok in ("|", "&&", ";", ">", "<", "||") for tok in argv):
            raise SnippetError(f"{block.path}:{block.line + start}: pipes, redirections and "
                               "command lists do not run in a doc shell block")
        commands.append((block.line + start, argv[1:]))
    return commands


def run_shell(block: Block, code: str, cli_main: Callable[[list[str]], int]) -> str:
    """Run each command; return what they printed (stdout), raise on a non-zero exit."""
    printed = []
    for line, argv in shell_commands(block, code):
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code_ = cli_main(argv)
        except SystemExit as exit_:  # argparse errors
            code_ = exit_.code
        except Exception:
            raise SnippetError(f"{block.path}:{line}: `splice {shlex.join(argv)}` raised:\n"
                               f"{traceback.format_exc()}") from None
        if code_ not in (0, None):
            raise SnippetError(f"{block.path}:{line}: `splice {shlex.join(argv)}` exited {code_}:\n"
                               f"{err.getvalue()[-3000:]}")
        printed.append(out.getvalue())
    return "".join(printed)


# -- python blocks ---------------------------------------------------------------------------
def run_python(block: Block, code: str, namespace: dict[str, Any]) -> None:
    """Exec in `namespace`; tracebacks point at the Markdown file and its line numbers."""
    if code.lstrip().startswith(">>>"):
        run_doctest(block, code, namespace)
        return
    source = "\n" * (block.line - 1) + code
    try:
        compiled = compile(source, block.path, "exec")
        exec(compiled, namespace)  # noqa: S102  (the docs' own examples)
    except Exception:
        raise SnippetError(f"{block.where}: python block failed:\n"
                           f"{format_doc_traceback(block.path)}") from None


def format_doc_traceback(path: str) -> str:
    """The traceback from the page's frames on (the harness's own frames left out)."""
    lines = traceback.format_exc().splitlines()
    start = next((i for i, line in enumerate(lines) if f'File "{path}"' in line), 1)
    return "\n".join(lines[:1] + lines[start:])


def run_doctest(block: Block, code: str, namespace: dict[str, Any]) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(code, namespace, block.where, block.path, block.line - 1)
    report = io.StringIO()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    runner.run(test, out=report.write, clear_globs=False)
    namespace.update(test.globs)  # DocTest runs on a copy; later blocks see what this one made
    if runner.failures:
        raise SnippetError(f"{block.where}: doctest failed ({runner.failures} example(s)):\n"
                           f"{report.getvalue()}")


def run_json(block: Block, code: str) -> None:
    try:
        json.loads(code)
    except json.JSONDecodeError as err:
        line = block.line + err.lineno - 1
        raise SnippetError(f"{block.path}:{line}: invalid JSON: {err.msg}") from None


def normalized(text: str) -> str:
    return "\n".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def check_output(block: Block, printed: str | None) -> None:
    if printed is None:
        raise SnippetError(f"{block.where}: an output block must follow a shell block that ran as "
                           "written (not skipped, not model=tiny)")
    if normalized(block.code) not in normalized(printed):
        raise SnippetError(f"{block.where}: the output shown is not what the command printed; "
                           f"it printed:\n{printed}")


def run_page(blocks: list[Block], *, cli_main: Callable[[list[str]], int],
             tiny_model: str | None = None, languages: set[str] = RUN_LANGS) -> int:
    """Run a page's blocks in order (the caller sets the working directory). Returns how many
    blocks ran."""
    namespace: dict[str, Any] = {"__name__": "__doc_snippet__"}
    printed: str | None = None  # stdout of the last shell block that ran as written
    ran = 0
    for block in blocks:
        if "output" in block.directives and block.runs:
            if SHELL_LANGS & languages:
                check_output(block, printed)
                ran += 1
            continue
        if block.lang in SHELL_LANGS:
            printed = None  # an output block shows the shell block right before it, or fails
        if not block.runs or block.lang not in languages:
            continue
        code = substitute_model(block, tiny_model)
        if block.lang == "python":
            run_python(block, code, namespace)
        elif block.lang in SHELL_LANGS:
            out = run_shell(block, code, cli_main)
            printed = out if code == block.code else None
        else:
            run_json(block, code)
        ran += 1
    return ran


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line, target) of each relative Markdown link outside code blocks (no URL scheme, not
    anchor-only); the target without its #anchor."""
    out, in_code = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            out.append((number, target.split("#", 1)[0]))
    return out

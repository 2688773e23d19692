"""The doc-snippet harness itself: it finds every block with its line, honours directives, and
fails (naming file:line) when a block fails, so a broken example cannot pass unnoticed."""

from __future__ import annotations

import pytest

from doc_snippets import (Block, SnippetError, extract_blocks, relative_links, run_page,
                          shell_commands)

PAGE = """# Title

```python
x = 1
```

Some text.

<!-- test: model=tiny -->

```sh
splice params --model smollm2-135m \\
    --rank 2   # comment
splice methods
```

```text
not run
```

<!-- test: skip=needs minutes of training -->
```python
raise RuntimeError("never runs")
```

```python
>>> x + 1
2
```
"""


def never_called(argv):
    raise AssertionError(f"CLI called with {argv}")


def test_blocks_lines_languages_and_directives():
    blocks = extract_blocks(PAGE, "page.md")
    assert [(b.lang, b.line) for b in blocks] == [
        ("python", 4), ("sh", 12), ("text", 18), ("python", 23), ("python", 27)]
    assert blocks[1].directives == {"model": "tiny"}
    assert blocks[3].directives == {"skip": "needs minutes of training"} and not blocks[3].runs
    assert blocks[0].directives == {} and blocks[2].directives == {}
    assert not blocks[1].needs_real_model  # swapped for the tiny model
    assert Block("p.md", 1, "python", 'load_model("smollm2-135m")\n').needs_real_model
    minilm = Block("p.md", 1, "python", 'load_model("minilm-l6")\n', {"model": "tiny"})
    assert minilm.needs_real_model
    assert not Block("p.md", 1, "text", 'smollm2-135m: 210 linear layers\n').needs_real_model


def test_shell_commands_join_continuations_and_drop_comments():
    block = extract_blocks(PAGE, "page.md")[1]
    assert shell_commands(block, block.code) == [
        (12, ["params", "--model", "smollm2-135m", "--rank", "2"]), (14, ["methods"])]


def test_page_runs_in_order_with_a_shared_namespace_and_the_tiny_model():
    calls = []
    ran = run_page(extract_blocks(PAGE, "page.md"), tiny_model="/tiny",
                   cli_main=lambda argv: calls.append(argv) or 0)
    assert ran == 3  # python, sh, doctest; text and the skipped block do not run
    assert calls[0][:3] == ["params", "--model", "/tiny"]


def test_a_failing_python_block_names_the_file_and_line():
    page = "text\n\n```python\na = 1\nb = a / 0\n```\n"
    with pytest.raises(SnippetError, match=r"^p\.md:4: python block failed") as info:
        run_page(extract_blocks(page, "p.md"), cli_main=never_called)
    assert 'File "p.md", line 5' in str(info.value) and "ZeroDivisionError" in str(info.value)


def test_a_wrong_doctest_output_fails():
    page = "```python\n>>> 1 + 1\n3\n```\n"
    with pytest.raises(SnippetError, match=r"p\.md:2: doctest failed"):
        run_page(extract_blocks(page, "p.md"), cli_main=never_called)


def test_a_failing_cli_command_names_its_line():
    page = "```sh\nsplice methods\nsplice params --shape 4096by4096\n```\n"
    with pytest.raises(SnippetError, match=r"p\.md:3: `splice params --shape 4096by4096` exited 2"):
        run_page(extract_blocks(page, "p.md"), cli_main=lambda argv: 2 if "params" in argv else 0)


def test_non_splice_shell_commands_must_be_skipped_with_a_reason():
    with pytest.raises(SnippetError, match=r"p\.md:2: only `splice \.\.\.` commands"):
        run_page(extract_blocks("```sh\nmake demo\n```\n", "p.md"), cli_main=never_called)
    with pytest.raises(SnippetError, match="needs a reason"):
        extract_blocks("<!-- test: skip -->\n```sh\nmake demo\n```\n", "p.md")
    assert run_page(extract_blocks("<!-- test: skip=slow -->\n```sh\nmake demo\n```\n", "p.md"),
                    cli_main=never_called) == 0


def test_malformed_directives_are_errors():
    with pytest.raises(SnippetError, match="unknown test directive 'skipp'"):
        extract_blocks("<!-- test: skipp=x -->\n```python\n```\n", "p.md")
    with pytest.raises(SnippetError, match="p.md:1: a test directive must be followed"):
        extract_blocks("<!-- test: model=tiny -->\nprose\n```python\n```\n", "p.md")
    with pytest.raises(SnippetError, match="never names smollm2-135m"):
        run_page(extract_blocks("<!-- test: model=tiny -->\n```python\nx = 1\n```\n", "p.md"),
                 tiny_model="/tiny", cli_main=never_called)


def test_invalid_json_fails_and_unclosed_fences_are_errors():
    with pytest.raises(SnippetError, match=r"p\.md:3: invalid JSON"):
        run_page(extract_blocks('```json\n{"a": 1,\n "b": }\n```\n', "p.md"), cli_main=never_called)
    with pytest.raises(SnippetError, match="never closed"):
        extract_blocks("```python\nx = 1\n", "p.md")


def test_relative_links_skip_code_urls_and_anchors():
    text = "[a](methods/lora.md#math) [b](https://x.org) [c](#top)\n```\n[d](no.md)\n```\n"
    assert relative_links(text) == [(1, "methods/lora.md")]


OUTPUT_PAGE = """```sh
splice params --shape 4x4
```

<!-- test: output -->
```text
LoRA  trains 8
```
"""


def test_output_blocks_must_match_what_the_command_printed():
    def cli(argv):
        print("header\nLoRA trains 8 vs 16")
        return 0
    assert run_page(extract_blocks(OUTPUT_PAGE, "p.md"), cli_main=cli) == 2

    def other(argv):
        print("LoRA trains 9")
        return 0
    with pytest.raises(SnippetError, match=r"p\.md:7: the output shown is not what the command"):
        run_page(extract_blocks(OUTPUT_PAGE, "p.md"), cli_main=other)


def test_output_of_a_substituted_or_skipped_command_cannot_be_claimed():
    tiny = "<!-- test: model=tiny -->\n```sh\nsplice params --model smollm2-135m\n```\n" + \
        "<!-- test: output -->\n```text\nx\n```\n"
    with pytest.raises(SnippetError, match="must follow a shell block that ran as written"):
        run_page(extract_blocks(tiny, "p.md"), tiny_model="/tiny", cli_main=lambda argv: 0)
    skipped = OUTPUT_PAGE.replace("```sh", "<!-- test: skip=slow -->\n```sh")
    with pytest.raises(SnippetError, match="must follow a shell block that ran as written"):
        run_page(extract_blocks(skipped, "p.md"), cli_main=never_called)

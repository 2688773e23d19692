"""`splice params` and `splice methods`, run through the real entry point."""

from __future__ import annotations

import re

import pytest
from transformers import LlamaForCausalLM

from splice.cli.main import main
from splice.core.registry import METHODS


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_params_shape_gives_the_paper_example(capsys):
    code, out, _ = run_cli(capsys, "params", "--shape", "4096x4096", "--rank", "8")
    assert code == 0
    assert "65,536" in out and "16,777,216" in out and "256x" in out


@pytest.mark.parametrize("shape,rank", [("576x1536", 16), ("10x3", 1)])
def test_params_shape_matches_closed_form(capsys, shape, rank):
    out_f, in_f = map(int, shape.split("x"))
    _, out, _ = run_cli(capsys, "params", "--shape", shape, "--rank", str(rank))
    assert f"LoRA trains {rank * (in_f + out_f):,} vs {out_f * in_f:,}" in out


def test_params_on_a_model_folder_counts_per_module_type(capsys, tmp_path, tiny_llama: LlamaForCausalLM):
    tiny_llama.save_pretrained(tmp_path)
    code, out, _ = run_cli(capsys, "params", "--model", str(tmp_path), "--rank", "2", "--targets", "q_proj,v_proj")
    assert code == 0
    # q_proj 32->32 and v_proj 32->16 in 2 layers: 2·(2·(32+32)) + 2·(2·(32+16))
    assert re.search(r"q_proj\s+2\s+256\b", out) and re.search(r"v_proj\s+2\s+192\b", out)
    assert "trainable: 448 of" in out


def test_bad_shape_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "params", "--shape", "4096by4096")
    assert code == 2 and "OUTxIN" in err


def test_methods_lists_every_registered_method(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    for name, spec in METHODS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert ("yes" in line) == spec.mergeable
        assert spec.trains in line
        assert f"{spec.file_format} ({spec.peft_type})" in line
    assert set(METHODS) >= {"lora", "dora", "ia3", "prompt", "prefix", "adapter"}
    assert METHODS["adapter"].file_format == "splice"  # peft cannot load bottleneck adapters


def test_unknown_model_error_names_known_models(capsys):
    code, _, err = run_cli(capsys, "params", "--model", "no-such-model")
    assert code == 2 and "smollm2-135m" in err


@pytest.mark.integration
def test_params_on_smollm2_all_linear(capsys):
    code, out, _ = run_cli(capsys, "params", "--model", "smollm2-135m", "--rank", "8", "--targets", "all-linear")
    assert code == 0
    assert "2,442,240" in out and "134,515,008" in out

"""`splice analyze` through the real entry point on a tiny model folder: the table, summary,
PNGs and JSON of one adapter (the JSON equals the library's analysis of the same folders), the
comparison of two adapters, and bad requests refused with a message."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

import splice
from helpers import randomize_adapter
from splice.analysis import analyze_adapter, compare_adapters
from splice.cli.main import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def folders(tmp_path, tiny_llama) -> tuple[Path, Path, Path, torch.nn.Module]:
    """The tiny Llama as a model folder, two LoRA adapters on it, and the model holding both
    (as 'a' and 'b') for reference numbers."""
    tiny_llama.save_pretrained(tmp_path / "model")
    model = copy.deepcopy(tiny_llama)
    for i, name in enumerate(("a", "b")):
        splice.attach(model, splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]), name)
        randomize_adapter(model, name, seed=i, scale=0.2)
        splice.save_adapter(model, tmp_path / name, name)
    return tmp_path / "model", tmp_path / "a", tmp_path / "b", model


def test_analyze_prints_the_table_and_writes_plots_and_json(capsys, tmp_path, folders):
    model_dir, folder_a, _, model = folders
    code, out, err = run_cli(capsys, "analyze", "--model", model_dir, "--adapter", folder_a,
                             "--top-k", 5, "--epsilon", "0.3,0.5,0.7", "--png", tmp_path / "fig",
                             "--json", tmp_path / "out" / "analysis.json")
    assert code == 0, err
    reference = analyze_adapter(model, "a", top_k=5, epsilons=(0.3, 0.5, 0.7))
    for row in reference.matrices:
        assert row.path in out
    assert f"{reference.summary.intruder_dimensions} at ε=0.5" in out
    assert "ε=0.3:" in out and "ε=0.7:" in out
    data = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert data["summary"]["intruder_dimensions"] == reference.summary.intruder_dimensions
    assert data["config"] == {"top_k": 5, "epsilons": [0.3, 0.5, 0.7], "epsilon": 0.5}
    assert [m["path"] for m in data["matrices"]] == [m.path for m in reference.matrices]
    for row, ref in zip(data["matrices"], reference.matrices):
        assert row["delta_norm"] == pytest.approx(ref.delta_norm, rel=1e-6)
        assert row["singular_values"] == pytest.approx(list(ref.spectrum.values), rel=1e-5)
        assert set(row["intruder_counts"]) == {"0.3", "0.5", "0.7"}
    for name in ("fig-spectra.png", "fig-intruders.png"):
        assert matplotlib.image.imread(tmp_path / name).ndim == 3


def test_compare_prints_the_cosines(capsys, folders):
    model_dir, folder_a, folder_b, model = folders
    code, out, err = run_cli(capsys, "analyze", "--model", model_dir, "--compare", folder_a,
                             folder_b)
    assert code == 0, err
    reference = compare_adapters(model, "a", "b")
    assert f"cosine of the whole updates: {reference.cosine:+.4f}" in out
    for row in reference.matrices:
        assert row.path in out and f"{row.cosine:+.4f}" in out
    code, out, err = run_cli(capsys, "analyze", "--model", model_dir, "--compare", folder_a,
                             folder_a)
    assert code == 0, err
    assert "cosine of the whole updates: +1.0000" in out


@pytest.mark.parametrize("extra, message", [
    (["--epsilon", "0.5,2"], "in (0, 1]"),
    (["--top-k", "0"], "top_k=0"),
])
def test_bad_settings_exit_with_a_message(capsys, folders, extra, message):
    model_dir, folder_a, _, _ = folders
    code, _, err = run_cli(capsys, "analyze", "--model", model_dir, "--adapter", folder_a, *extra)
    assert code == 2 and message in err


def test_png_with_compare_is_refused(capsys, folders, tmp_path):
    model_dir, folder_a, folder_b, _ = folders
    code, _, err = run_cli(capsys, "analyze", "--model", model_dir, "--compare", folder_a,
                           folder_b, "--png", tmp_path / "x")
    assert code == 2 and "--adapter" in err

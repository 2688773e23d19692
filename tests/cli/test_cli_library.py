"""`splice library` through the real entry point, on a tiny model saved as a folder: add, list,
show, rename, rm; refusals of another base's adapter (both fingerprints named) and of bad names;
the named model's fingerprint cached in library.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import splice
import splice.library.fingerprints as fingerprints
from splice.cli.main import main
from splice.core.io import CONFIG_FILE
from splice.models import model_fingerprint

LORA = splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"])


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save_adapter(model, folder: Path, *, fingerprint: str | None = None) -> Path:
    adapted = splice.attach(copy.deepcopy(model), LORA)
    with torch.no_grad():
        for param in adapted.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.1)
    splice.save_adapter(adapted, folder)
    if fingerprint is not None:
        (folder / "training.json").write_text(json.dumps({"base_model_fingerprint": fingerprint}))
    return folder


@pytest.fixture
def base(tmp_path, tiny_llama) -> Path:
    tiny_llama.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_add_list_show_rename_rm(capsys, tmp_path, tiny_llama, base):
    lib = tmp_path / "lib"
    adapter = save_adapter(tiny_llama, tmp_path / "adapter")
    code, out, err = run_cli(capsys, "library", "add", "--library", lib, "--model", base, "--name",
                             "demo", "--notes", "q and v", adapter)
    assert code == 0 and "added 'demo' (lora" in out and "fits-model" in out
    config = json.loads((adapter / CONFIG_FILE).read_text())
    code, out, _ = run_cli(capsys, "library", "list", "--library", lib, "--json")
    [row] = json.loads(out)
    assert code == 0 and row["name"] == "demo" and row["method"] == "lora"
    assert row["rank"] == config["r"] and row["targets"] == config["target_modules"]
    assert row["size_bytes"] == sum(p.stat().st_size for p in adapter.iterdir())
    assert row["notes"] == "q and v" and row["provenance"] == "fits-model"
    _, table, _ = run_cli(capsys, "library", "list", "--library", lib)
    assert model_fingerprint(tiny_llama)[:16] in table
    line = next(line for line in table.splitlines() if line.startswith("demo "))
    assert line.split()[:4] == ["demo", "lora", "4", "q_proj,v_proj"] and line.endswith("q and v")
    code, out, _ = run_cli(capsys, "library", "show", "--library", lib, "demo")
    assert code == 0 and "fits-model: " in out and "q and v" in out and str(adapter.resolve()) in out
    assert run_cli(capsys, "library", "rename", "--library", lib, "demo", "demo-v1")[0] == 0
    _, out, _ = run_cli(capsys, "library", "list", "--library", lib, "--json")
    assert [r["name"] for r in json.loads(out)] == ["demo-v1"]
    assert run_cli(capsys, "library", "rm", "--library", lib, "demo-v1")[0] == 0
    _, out, _ = run_cli(capsys, "library", "list", "--library", lib, "--json")
    assert json.loads(out) == []
    code, _, err = run_cli(capsys, "library", "rm", "--library", lib, "demo-v1")
    assert code == 2 and "no adapter named 'demo-v1'" in err


def test_adapter_of_another_base_is_refused_naming_both_fingerprints(capsys, tmp_path, tiny_llama, base):
    lib = tmp_path / "lib"
    ours = model_fingerprint(tiny_llama)
    run_cli(capsys, "library", "add", "--library", lib, "--model", base, "--name", "mine",
            save_adapter(tiny_llama, tmp_path / "mine", fingerprint=ours))
    theirs = "ab" * 32
    foreign = save_adapter(tiny_llama, tmp_path / "foreign", fingerprint=theirs)
    code, _, err = run_cli(capsys, "library", "add", "--library", lib, "--model", base, "--name",
                           "foreign", foreign)
    assert code == 2 and ours in err and theirs in err and "--force" in err
    code, out, _ = run_cli(capsys, "library", "add", "--library", lib, "--model", base, "--name",
                           "foreign", "--force", foreign)
    assert code == 0 and "forced" in out and "warning" in out
    _, out, _ = run_cli(capsys, "library", "show", "--library", lib, "foreign", "--json")
    assert json.loads(out)["base_fingerprint"] == theirs


def test_the_model_fingerprint_is_cached_until_the_folder_changes(capsys, tmp_path, tiny_llama, base,
                                                                  monkeypatch):
    lib = tmp_path / "lib"
    adapter = save_adapter(tiny_llama, tmp_path / "adapter", fingerprint=model_fingerprint(tiny_llama))
    assert run_cli(capsys, "library", "add", "--library", lib, "--model", base, "--name", "a", adapter)[0] == 0
    cache = json.loads((lib / "library.json").read_text())["fingerprint_cache"]
    assert cache[str(base.resolve())]["fingerprint"] == model_fingerprint(tiny_llama)
    loads = []
    real = fingerprints.load_model
    monkeypatch.setattr(fingerprints, "load_model", lambda name: loads.append(name) or real(name))
    assert run_cli(capsys, "library", "add", "--library", lib, "--model", base, "--name", "b", adapter)[0] == 0
    assert loads == []
    with torch.no_grad():
        tiny_llama.lm_head.weight.mul_(2.0)
    tiny_llama.save_pretrained(base)
    code, _, err = run_cli(capsys, "library", "add", "--library", lib, "--model", base, "--name", "c", adapter)
    assert loads == [str(base)] and code == 2 and model_fingerprint(tiny_llama) in err


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "v1.0"])
def test_bad_names_are_refused(capsys, tmp_path, tiny_llama, base, name):
    code, _, err = run_cli(capsys, "library", "add", "--library", tmp_path / "lib", "--model", base,
                           "--name", name, save_adapter(tiny_llama, tmp_path / "adapter"))
    assert code == 2 and "invalid" in err and "path separators" in err
    assert not (tmp_path / "lib").exists() and not (tmp_path / "escape").exists()


def test_a_missing_library_is_a_clear_error(capsys, tmp_path):
    for action in (["list"], ["show", "x"]):
        code, _, err = run_cli(capsys, "library", *action, "--library", tmp_path / "nowhere")
        assert code == 2 and "no adapter library" in err and "library add" in err


@pytest.mark.integration
def test_a_trained_adapter_is_checked_by_its_recorded_fingerprint(capsys, tmp_path, tiny_chat_model,
                                                                  tiny_data):
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_chat_model), "--data", str(tiny_data[0]), "--rank", "2",
                 "--steps", "2", "--batch-size", "4", "--save-every", "1", "--output", str(run),
                 "--no-progress"]) == 0
    assert (run / "checkpoints").is_dir()
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "library", "add", "--library", tmp_path / "lib", "--model",
                           tiny_chat_model, "--name", "trained", run)
    assert code == 0 and "recorded" in out
    copied = sorted(p.name for p in (tmp_path / "lib" / "adapters" / "trained").iterdir())
    assert "training.json" in copied and "checkpoints" not in copied
    model, _ = splice.load_model(tiny_chat_model)
    library = splice.AdapterLibrary(tmp_path / "lib")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        expected = splice.load_adapter(copy.deepcopy(model), run)(ids).logits
        assert torch.equal(library.load_into(model, "trained")(ids).logits, expected)

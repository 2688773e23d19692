"""`splice compose` end to end on a tiny model folder: the written adapter is the library's
composition of the same folders, it loads in peft, and bad requests exit with a message."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import splice
from helpers import logits, randomize_adapter, token_ids
from splice.cli.main import main
from splice.core.layer import adapter_layers


@pytest.fixture
def folders(tmp_path):
    """A tiny random Llama saved as a model folder (no tokenizer), and two LoRA adapters on it."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    adapters = []
    for i, targets in enumerate((["q_proj", "v_proj"], ["v_proj", "down_proj"])):
        model, _ = splice.load_model(model_dir)
        splice.attach(model, splice.LoRAConfig(rank=2 + i, target_modules=targets), "default")
        randomize_adapter(model, seed=i, scale=0.3)
        adapters.append(splice.save_adapter(model, tmp_path / f"adapter{i}"))
    return model_dir, adapters


def deltas(model, name: str) -> dict[str, torch.Tensor]:
    return {p: layer.delta_weight(name).detach() for p, layer in adapter_layers(model)
            if layer.has_adapter(name)}


def test_compose_cli_writes_the_library_composition(folders, tmp_path, capsys):
    model_dir, (a, b) = folders
    out = tmp_path / "ties"
    rc = main(["compose", "--model", str(model_dir), "--adapters", f"{a},{b}", "--weights",
               "1,-0.5", "--method", "ties", "--density", "0.5", "--rank", "3",
               "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "truncation error" in printed and "model.layers.1.mlp.down_proj" in printed
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3

    # The same composition through the library, in process.
    reference, _ = splice.load_model(model_dir)
    splice.load_adapter(reference, a, "a")
    splice.load_adapter(reference, b, "b")
    report = splice.compose_adapters(reference, ["a", "b"], [1.0, -0.5], "ties", density=0.5,
                                     rank=3, new_name="ref")
    assert f"{report.error:.3%}" in printed
    written, _ = splice.load_model(model_dir)
    splice.load_adapter(written, out, "cli")
    ours, expected = deltas(written, "cli"), deltas(reference, "ref")
    assert ours.keys() == expected.keys() == {m.path for m in report.modules}
    for path in expected:
        torch.testing.assert_close(ours[path], expected[path], atol=1e-6, rtol=0)

    # And peft reads the folder to the same logits.
    base, _ = splice.load_model(model_dir)
    twin = PeftModel.from_pretrained(base, out).eval()
    ids = token_ids(written)
    torch.testing.assert_close(logits(twin, ids), logits(written, ids), atol=1e-5, rtol=0)


def test_compose_cli_negative_first_weight_and_default_method(folders, tmp_path):
    model_dir, (a, b) = folders
    out = tmp_path / "diff"
    assert main(["compose", "--model", str(model_dir), "--adapters", f"{a},{b}",
                 "--weights=-1,1", "--output", str(out)]) == 0
    written, _ = splice.load_model(model_dir)
    splice.load_adapter(written, out, "cli")
    for i, folder in enumerate((a, b)):
        splice.load_adapter(written, folder, f"in{i}", activate=False)
    expected: dict[str, torch.Tensor] = {}
    for name, w in (("in0", -1.0), ("in1", 1.0)):
        for path, delta in deltas(written, name).items():
            expected[path] = expected.get(path, 0) + w * delta
    ours = deltas(written, "cli")
    assert ours.keys() == expected.keys()
    for path in expected:
        torch.testing.assert_close(ours[path], expected[path], atol=1e-6, rtol=0)


@pytest.mark.parametrize("extra, message", [
    (["--method", "ties"], "needs a density"),
    (["--weights", "1,2,3"], "weight per adapter"),
])
def test_compose_cli_refuses_with_a_message(extra, message, folders, tmp_path, capsys):
    model_dir, (a, b) = folders
    rc = main(["compose", "--model", str(model_dir), "--adapters", f"{a},{b}",
               "--output", str(tmp_path / "out"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compose_cli_never_overwrites_an_adapter(folders, capsys):
    model_dir, (a, b) = folders
    before = (a / "adapter_model.safetensors").read_bytes()
    rc = main(["compose", "--model", str(model_dir), "--adapters", f"{a},{b}", "--output", str(a)])
    assert rc == 2 and "not an empty folder" in capsys.readouterr().err
    assert (a / "adapter_model.safetensors").read_bytes() == before

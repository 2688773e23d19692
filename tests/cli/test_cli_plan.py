"""`splice plan`, run through the real entry point."""

from __future__ import annotations

import json
import re

from transformers import LlamaConfig

from splice.cli.main import main
from splice.plan import plan_memory, shape_from_preset

GIB = 2 ** 30


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def row(out: str, label: str) -> list[float]:
    line = next(l for l in out.splitlines() if l.startswith(label))
    return [float(v.replace(",", "")) for v in line[len(label):].split()]


def test_examples_print_the_headline_cases(capsys):
    code, out, _ = run_cli(capsys, "plan", "--examples")
    assert code == 0
    assert "LLaMA 7B" in out and "LLaMA 65B" in out
    assert out.count("full fine-tuning: 16.0 bytes/param") == 2
    sixty_five = out[out.index("LLaMA 65B"):]
    assert re.search(r"QLoRA \(paged optimizer\) peaks at \d\d\.\d GB: fits a 48 GB GPU", sixty_five)
    full, lora, qlora = row(sixty_five, "total (peak)")
    assert qlora < 48e9 / GIB < lora < full


def test_params_preset_table_matches_the_library(capsys):
    code, out, _ = run_cli(capsys, "plan", "--params", "13B", "--rank", "8", "--batch", "2",
                           "--seq", "256", "--dtype", "fp32")
    assert code == 0
    assert "llama 13B (13.02B params), fp32, batch 2 × 256" in out
    plans = [plan_memory(shape_from_preset("13B"), m, rank=8, batch=2, seq=256, dtype="fp32")
             for m in ("full", "lora", "qlora")]
    for label, field in [("frozen weights", "frozen_weights"), ("activations", "activations"),
                         ("total (peak)", "total")]:
        assert row(out, label) == [round(getattr(p, field) / GIB, 2) for p in plans]


def test_one_method_as_json_and_a_png(capsys, tmp_path):
    png = tmp_path / "plan.png"
    code, out, _ = run_cli(capsys, "plan", "--params", "7B", "--method", "qlora", "--optimizer",
                           "paged", "--grad-checkpointing", "--json", "--png", str(png))
    assert code == 0
    plans = json.loads(out[:out.rindex("chart:")])
    assert [p["settings"]["method"] for p in plans] == ["qlora"]
    assert plans[0]["settings"]["optimizer"] == "paged_adamw" and plans[0]["host_optimizer_state"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_model_folder_shape_comes_from_its_config(capsys, tmp_path):
    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2,
                tie_word_embeddings=True).save_pretrained(tmp_path)
    code, out, _ = run_cli(capsys, "plan", "--model", str(tmp_path), "--rank", "4")
    assert code == 0
    # 1000·64 embedding + 3 blocks of (2·64·64 + 2·32·64 + 3·128·64 + 2·64) + 64
    assert f"({(64_000 + 3 * (8192 + 4096 + 24576 + 128) + 64) / 1e9:.2f}B params)" in out
    # LoRA r=4 on 7 projections: 4·(64+64)·2 + 4·(64+32)·2 + 4·(64+128)·3 per block
    assert row(out, "trainable params")[1] == 3 * (1024 + 768 + 2304)


def test_bad_input_names_the_flag(capsys):
    code, _, err = run_cli(capsys, "plan", "--params", "8B")
    assert code == 2 and "--params '8B'" in err and "7B" in err
    code, _, err = run_cli(capsys, "plan", "--params", "7B", "--targets", "c_attn")
    assert code == 2 and "--targets 'c_attn' selects no module" in err

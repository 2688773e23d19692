"""`--method qlora` end to end on a tiny model: train on a 4-bit base, merge, re-quantize."""

from __future__ import annotations

import json

import pytest
import torch

import splice
from helpers import logits, token_ids
from splice.merge.export import export_merged
from splice.quant import Linear4bit, quantize_model
from splice.train.run import run_training
from test_train_loop import make_config

pytestmark = pytest.mark.integration  # SmolLM2's tokenizer from the bundled package


@pytest.fixture(scope="module")
def qlora_run(tiny_chat_model, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("qlora") / "run"
    return run_training(make_config(tiny_chat_model, tiny_data, out, method="qlora"), show_progress=False)


def adapted_4bit_base(model_path, adapter):
    model, _ = splice.load_model(str(model_path))
    quantize_model(model)
    splice.load_adapter(model, adapter)
    return model


def test_qlora_run_records_its_base_and_trains_only_the_adapter(qlora_run, tiny_chat_model):
    record = json.loads((qlora_run.output / "training.json").read_text())
    assert record["base_quantization"] == {"quant_type": "nf4", "block_size": 64, "double_quant": True}
    lora = splice.load_model(str(tiny_chat_model))[0]
    splice.attach(lora, splice.LoRAConfig(rank=4, target_modules="all-linear"))
    assert qlora_run.trainable == splice.core.accounting.count_trainable(lora).trainable
    assert qlora_run.final_loss < record["metrics"]["final_train_loss"] + 1e-9


def test_merge_uses_the_dequantized_4bit_base_and_requantize_reports_its_error(qlora_run, tiny_chat_model, tmp_path):
    reference = adapted_4bit_base(tiny_chat_model, qlora_run.output)
    assert any(isinstance(m, Linear4bit) for m in reference.modules())
    ids = token_ids(reference)
    expected = logits(reference, ids)

    report = export_merged(str(tiny_chat_model), qlora_run.output, tmp_path / "m32", dtype=torch.float32)
    merged, _ = splice.load_model(tmp_path / "m32")
    assert not any(isinstance(m, Linear4bit) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), expected, atol=1e-5, rtol=0)

    default = export_merged(str(tiny_chat_model), qlora_run.output, tmp_path / "m16")
    assert default.dtype == "bfloat16" and report.base_quantization["quant_type"] == "nf4"
    assert next(splice.load_model(tmp_path / "m16", dtype=torch.bfloat16)[0].parameters()).dtype == torch.bfloat16

    requant = export_merged(str(tiny_chat_model), qlora_run.output, tmp_path / "m4", requantize=True)
    assert requant.requantize_error > requant.bf16_error > 0
    back, _ = splice.load_model(tmp_path / "m4")
    assert any(isinstance(m, Linear4bit) for m in back.modules())
    # the stated error is the error of what was written
    plain = splice.load_model(tmp_path / "m32")[0]
    num = den = 0.0
    for path, layer in splice.quant.quantized_layers(back):
        w = plain.get_submodule(path).weight
        num += float((layer.dequantize() - w.detach()).pow(2).sum())
        den += float(w.detach().pow(2).sum())
    assert abs((num / den) ** 0.5 - requant.requantize_error) < 1e-6

"""bias="all" keeps training and saving every base bias after later attaches wrap more modules
(wrapping renames `mlp.c_fc.bias` to `mlp.c_fc.base_layer.bias`)."""

from safetensors.torch import load_file

import splice


def bias_names(model):
    return {n for n, _ in model.named_parameters()
            if n.endswith(".bias") and "lora_" not in n}


def test_biases_stay_trainable_and_saved_after_a_later_attach_wraps_their_modules(tiny_gpt2, tmp_path):
    model = tiny_gpt2
    all_biases = len(bias_names(model))
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules=["c_attn"], bias="all"), "a")
    splice.attach(model, splice.LoRAConfig(rank=2, target_modules=["c_fc", "c_proj"]), "b", activate=False)
    assert any(".c_fc.base_layer.bias" in n for n in bias_names(model))  # the rename happened

    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert len(trainable) == all_biases
    splice.save_adapter(model, tmp_path / "a", "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert len([k for k in saved if k.endswith(".bias")]) == all_biases

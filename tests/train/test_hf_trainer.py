"""A splice-wrapped model trains under `transformers.Trainer`: the adapter learns, the base stays
bit-identical, and the trained adapter saves and reloads to the same logits."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import splice

STEPS = 8


class TokenDataset(torch.utils.data.Dataset):
    """Counting rows (each token is the previous plus one, so there is something to learn), as
    Trainer expects them: dicts of input_ids and labels."""

    def __init__(self, vocab_size: int, rows: int = 16, length: int = 12) -> None:
        starts = torch.randint(0, vocab_size, (rows, 1), generator=torch.Generator().manual_seed(1))
        self.ids = (starts + torch.arange(length)) % vocab_size  # (N, T)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(a tiny Llama with LoRA trained for STEPS by Trainer, an untouched copy of its base,
    the data set, Trainer's log history)."""
    torch.manual_seed(0)
    # initializer_range 0.3, not 0.02: the output head (not adapted) must be able to turn hidden
    # states into confident logits, or 8 steps can barely move the loss.
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         initializer_range=0.3)
    model = LlamaForCausalLM(config)
    base = copy.deepcopy(model).eval()
    splice.attach(model, splice.LoRAConfig(rank=4, target_modules="all-linear"))
    args = TrainingArguments(output_dir=str(tmp_path_factory.mktemp("trainer")), max_steps=STEPS,
                             per_device_train_batch_size=4, learning_rate=5e-2, lr_scheduler_type="constant",
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    data = TokenDataset(config.vocab_size)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return model, base, data, trainer.state.log_history


@torch.no_grad()
def mean_loss(model: torch.nn.Module, data: TokenDataset) -> float:
    model.eval()
    return float(model(input_ids=data.ids, labels=data.ids).loss)


def test_trainer_moves_only_the_adapter(trained):
    model, base, data, history = trained
    assert len([entry for entry in history if "loss" in entry]) == STEPS
    # zero-initialised B: before training the adapted model is the base
    assert mean_loss(model, data) < mean_loss(base, data) - 1.0  # ~6.4 -> ~3.3
    params = dict(model.named_parameters())
    lora_b = [p for name, p in params.items() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    for name, weight in base.named_parameters():
        # attach wraps a targeted Linear; its frozen weight sits under `base_layer`
        wrapped = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        current = params.get(name, params.get(wrapped))
        assert current is not None, name
        assert torch.equal(current, weight), name
        assert not current.requires_grad, name


def test_trainer_trained_adapter_saves_and_reloads(trained, tmp_path):
    model, base, _, _ = trained
    splice.save_adapter(model, tmp_path / "adapter")
    reloaded = copy.deepcopy(base)
    splice.load_adapter(reloaded, tmp_path / "adapter")
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)

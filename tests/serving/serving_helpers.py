"""Builders shared by the serving tests: a byte-level chat tokenizer, the tiny chat Llama and
random LoRA adapter folders."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import splice
import splice.serving.engine as engine_module
from helpers import randomize_adapter

BASE = "tiny"
ADAPTERS = ("a", "b", "c")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (so partial UTF-8 sequences occur), then <|im_start|> (256) and
    <|im_end|> (257, end of sequence), with a ChatML template."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(byte_chars)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   chat_template=CHATML)


def tiny_chat_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=96, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def save_random_lora(model, folder: Path, seed: int, rank: int = 4) -> Path:
    """A LoRA adapter with random non-zero A and B (so it changes the output), saved to folder."""
    splice.attach(model, splice.LoRAConfig(rank=rank, target_modules="all-linear"), "made")
    randomize_adapter(model, "made", seed=seed, scale=0.5)
    splice.save_adapter(model, folder, "made")
    splice.delete_adapter(model, "made")
    return folder


def record_logits(monkeypatch) -> dict[int, list[torch.Tensor]]:
    """Every logits row the engine samples from, by the id of the request's SamplingParams."""
    seen: dict[int, list[torch.Tensor]] = {}
    real = engine_module.next_token

    def recording(logits, params, generator):
        seen.setdefault(id(params), []).append(logits.clone())
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "next_token", recording)
    return seen

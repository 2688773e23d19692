"""Shared fixtures: tiny random models for unit tests, bundled SmolLM2 for integration tests."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

# Before anything imports huggingface_hub: the suite never touches the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The user cache, not a tmp folder: the SmolLM2 conversion (~20 s) should happen once per
# machine. Concurrent workers (pytest-xdist) are safe, the cache is built by atomic rename.
os.environ.setdefault("SPLICE_CACHE", str(Path.home() / ".cache" / "splice"))
# Idle OpenMP threads sleep instead of spinning: on a shared 2-core machine spinning threads
# made one SVD take 30 s instead of 0.5 s. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from splice.models import load_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    """A fresh random 2-layer Llama (GQA: 4 heads, 2 KV heads), untied, in eval mode."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    """A fresh random 2-layer GPT-2 (Conv1D layers, tied embeddings, random biases), in eval mode."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    # GPT-2 initialises its biases to zero; random ones let a merge that forgets a bias fail.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.02)
    return model


@pytest.fixture(scope="session")
def smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct in fp32, loaded once per session. Do not modify it in a test;
    use `smollm2_fresh` for that."""
    return load_model("smollm2-135m")


@pytest.fixture
def smollm2_fresh(smollm2) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A private deep copy of the session SmolLM2 that a test may modify freely."""
    model, tokenizer = smollm2
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, saved as a folder."""
    _, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("tiny-chat")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """Prompt/completion addition data: 30 training lines, 6 held out."""
    folder = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"Add {a} and {b}.", "completion": str(a + b)} for a in range(6) for b in range(6)]
    train, evals = folder / "train.jsonl", folder / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows[30:]))
    return train, evals

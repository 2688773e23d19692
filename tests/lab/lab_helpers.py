"""Helpers for the lab tests: a tiny random Llama with a character tokenizer (it answers gibberish,
but deterministically), a library of two LoRA adapters with random nonzero B (so merging one
visibly changes the answer), and the lab app on that model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import splice
from splice.core.layer import adapter_layers
from splice.generation import generate_reply
from splice.lab.bench import DEFAULT_PROMPT
from splice.lab.training import TrainSettings

ARTIFACTS = Path(os.environ.get("SPLICE_ARTIFACTS", Path(__file__).parents[1] / "artifacts")) / "lab"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
LIBRARY_ADAPTERS = {"formal": 1, "terse": 2}  # name -> seed of its random factors
TRAIN = TrainSettings(rank=4, targets=("q_proj", "v_proj"), steps=12, lr=2e-2, examples=4, seed=0)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (and newline); decoding joins them back."""
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def tiny_base(vocab_size: int) -> LlamaForCausalLM:
    """The same random 2-layer Llama on every call (seeded)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return LlamaForCausalLM(config).eval()


def make_library(folder: Path, base: torch.nn.Module, work: Path) -> splice.AdapterLibrary:
    library = splice.AdapterLibrary(folder)
    for name, seed in LIBRARY_ADAPTERS.items():
        torch.manual_seed(seed)
        splice.attach(base, splice.LoRAConfig(rank=4, target_modules=["q_proj", "v_proj"]), name)
        with torch.no_grad():
            for param_name, param in base.named_parameters():
                if f"lora_B.{name}." in param_name:
                    param.normal_(0.0, 0.5)
        splice.save_adapter(base, work / name, name)
        splice.delete_adapter(base, name)
        library.add(name, work / name, model=base)
    return library


def reference_answer(tokenizer, library_dir, merged: dict[str, float]) -> str:
    """The answer of a fresh base with Σ wᵢΔWᵢ added densely (ΔW from each adapter's factors)."""
    model = tiny_base(len(tokenizer))
    library = splice.AdapterLibrary(library_dir)
    deltas: dict[str, torch.Tensor] = {}
    for name, weight in merged.items():
        library.load_into(model, name, activate=False)
        for path, layer in adapter_layers(model):
            if layer.has_adapter(name):
                deltas[path] = deltas.get(path, 0) + weight * layer.delta_weight(name)
    for name in merged:
        splice.delete_adapter(model, name)
    with torch.no_grad():
        for path, delta in deltas.items():
            model.get_submodule(path).weight += delta
    return generate_reply(model, tokenizer, DEFAULT_PROMPT, max_new_tokens=24, out=None)


CHROMIUM = "/usr/bin/chromium"
# Without these, a headless Chromium on a machine with no network stalls on refused
# connections (component updates, sync, QUIC probes).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch_chromium(playwright, user_data_dir: Path):
    """Debian's Chromium, headless, with a fresh profile folder (never a downloaded browser)."""
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 1280, "height": 900})

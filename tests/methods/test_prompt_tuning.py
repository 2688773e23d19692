"""Prompt tuning against peft (files both ways, logits, greedy tokens, loss), against closed forms
(a text-initialised prompt is the base model reading that text), and splice's adapter life cycle.

peft's prompt-tuning logits carry the virtual positions first; splice's drop them, so the
comparisons take peft's [:, n:]. Tolerance 1e-5 absolute where two code paths meet; the same
code path is compared exactly.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import PromptTuningConfig as PeftPromptTuningConfig
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import splice
from helpers import assert_same_snapshot, snapshot, token_ids
from splice.train.data import render_prompt
from splice.train.evaluate import greedy_completions
from splice.train.loss import causal_lm_loss

ATOL = 1e-5
N = 4  # virtual tokens
INIT_TEXT = "classify the sentiment"  # 3 words + BOS: cut or repeated to N


@pytest.fixture
def models_by_kind(tiny_llama, tiny_gpt2):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    """A word-level tokenizer folder whose ids fit the tiny models' 128-token vocabulary; it adds
    a BOS (id 1), so init texts show the special tokens peft's init keeps."""
    words = ["<unk>", "<s>"] + [f"w{i}" for i in range(40)] + ["classify", "the", "sentiment"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("word-tokenizer")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    fast.save_pretrained(folder)
    return str(folder)


def text_ids(count: int) -> torch.Tensor:
    """INIT_TEXT's ids as word_tokenizer gives them, [<s> classify the sentiment], cut/repeated."""
    ids = [1, 42, 43, 44]
    return torch.tensor((ids * count)[:count])


def text_config(count: int, tokenizer: str) -> splice.PromptTuningConfig:
    return splice.PromptTuningConfig(num_virtual_tokens=count, init="text", init_text=INIT_TEXT,
                                     tokenizer_name_or_path=tokenizer)


def peft_made(base, tmp_path, **kwargs):
    """A peft prompt-tuning model (random init, N(0, 1)) and its saved folder."""
    peft_model = get_peft_model(copy.deepcopy(base), PeftPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, **kwargs)).eval()
    peft_model.save_pretrained(tmp_path)
    return peft_model


def left_padded_mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return mask


@torch.no_grad()
def peft_greedy(peft_model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full forward passes of the peft model, no cache: the reference for
    generate. (peft 0.21's own generate mishandles prompt learning under transformers 5, whose
    models take the KV cache as `cache`: it re-injects or drops the virtual tokens.)"""
    out = ids
    for _ in range(new_tokens):
        step = peft_model(input_ids=out).logits[:, -1]                # (B, V)
        out = torch.cat([out, step.argmax(-1, keepdim=True)], dim=1)
    return out


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos) + 1] if eos in row else row


@torch.no_grad()
def spliced_generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


# -- peft interop -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_made_file_loads_with_equal_logits(models_by_kind, kind, tmp_path):
    base = models_by_kind[kind]
    peft_model = peft_made(base, tmp_path)
    ids = token_ids(base)
    mask = left_padded_mask(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of peft's config is understood
        splice.load_adapter(base, tmp_path)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits[:, N:]
        torch.testing.assert_close(base(ids, attention_mask=mask).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_splice_file_loads_in_peft_with_equal_logits_and_peft_keys(models_by_kind, kind, tmp_path):
    base = models_by_kind[kind]
    model = copy.deepcopy(base)
    splice.attach(model, splice.PromptTuningConfig(num_virtual_tokens=N))
    splice.save_adapter(model, tmp_path / "ours")
    peft_made(base, tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("peft_version", "auto_mapping", "tokenizer_kwargs"):  # peft bookkeeping only
        theirs.pop(key)
    assert ours == theirs
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]
        assert tuple(f.get_tensor("prompt_embeddings").shape) == (N, base.config.hidden_size)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    ids = token_ids(base)
    mask = left_padded_mask(ids)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids, attention_mask=mask).logits[:, N:],
                                   model(ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generation_gives_peft_tokens(models_by_kind, kind, tmp_path):
    base = models_by_kind[kind]
    peft_model = peft_made(base, tmp_path)
    splice.load_adapter(base, tmp_path)
    ids = token_ids(base, batch=2, length=5, seed=3)
    ours = spliced_generate(base, ids, 8)[:, 5:].tolist()
    with splice.disable_adapters(base):
        plain = spliced_generate(base, ids, 8)[:, 5:].tolist()
    reference = peft_greedy(peft_model, ids, 8)[:, 5:].tolist()
    eos = base.generation_config.eos_token_id
    assert [until_eos(r, eos) for r in ours] == [until_eos(r, eos) for r in reference]
    assert ours != plain  # so the tokens show the adapter at work


def test_loss_equals_the_models_own_and_peft_with_the_first_label_masked(tiny_llama, tmp_path):
    """peft pads labels with -100 for the virtual positions, and so also scores labels[0] from the
    last virtual token; splice drops the virtual positions, scoring what the base model scores."""
    peft_model = peft_made(tiny_llama, tmp_path)
    splice.load_adapter(tiny_llama, tmp_path)
    ids = token_ids(tiny_llama)
    mask = left_padded_mask(ids)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    with torch.no_grad():
        chunked = causal_lm_loss(tiny_llama, ids, mask, labels, chunk_size=3)
        own = tiny_llama(ids, attention_mask=mask, labels=labels).loss
        theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(chunked, own, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, theirs, atol=ATOL, rtol=0)


def test_text_init_equals_peft_text_init(tiny_llama, word_tokenizer, tmp_path):
    peft_model = get_peft_model(copy.deepcopy(tiny_llama), PeftPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=INIT_TEXT, tokenizer_name_or_path=word_tokenizer))
    splice.attach(tiny_llama, text_config(6, word_tokenizer))
    ours = tiny_llama.adapter_prompt_tuning.prompt_embeddings["default"]
    assert torch.equal(ours, peft_model.prompt_encoder["default"].embedding.weight)


# -- what holds at init (closed forms) ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("count", [2, 6])  # cut and repeated
def test_text_init_is_the_base_model_reading_the_text(models_by_kind, kind, count, word_tokenizer):
    base = models_by_kind[kind]
    ids = token_ids(base)
    prefix = text_ids(count).expand(ids.shape[0], count)
    with torch.no_grad():
        expected = base(torch.cat([prefix, ids], dim=1)).logits[:, count:]
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)  # the text matters
    splice.attach(base, text_config(count, word_tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, expected, atol=ATOL, rtol=0)


def test_sample_vocab_init_rows_are_vocabulary_embeddings(tiny_llama):
    splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=5, init="sample_vocab"))
    rows = tiny_llama.adapter_prompt_tuning.prompt_embeddings["default"]
    table = tiny_llama.get_input_embeddings().weight
    assert all(any(torch.equal(row, entry) for entry in table) for row in rows)


def test_a_fresh_adapter_is_not_the_base_but_disabled_it_is_exactly(tiny_llama):
    ids = token_ids(tiny_llama)
    with torch.no_grad():
        expected = tiny_llama(ids).logits
        splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N))
        assert not tiny_llama.adapter_prompt_tuning.training  # follows the model's eval mode
        assert not torch.allclose(tiny_llama(ids).logits, expected, atol=1e-3)
        with splice.disable_adapters(tiny_llama):
            assert torch.equal(tiny_llama(ids).logits, expected)


# -- life cycle ---------------------------------------------------------------------------------
def test_two_active_prompts_are_concatenated_in_activation_order(tiny_llama, word_tokenizer):
    ids = token_ids(tiny_llama)
    splice.attach(tiny_llama, text_config(2, word_tokenizer), "a")
    splice.attach(tiny_llama, text_config(3, word_tokenizer), "b")
    splice.set_active_adapters(tiny_llama, ["b", "a"])
    prefix = torch.cat([text_ids(3), text_ids(2)]).expand(ids.shape[0], 5)
    with torch.no_grad():
        with splice.disable_adapters(tiny_llama):
            expected = tiny_llama(torch.cat([prefix, ids], dim=1)).logits[:, 5:]
        torch.testing.assert_close(tiny_llama(ids).logits, expected, atol=ATOL, rtol=0)


def test_gradients_reach_only_the_active_prompt(tiny_llama):
    splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N), "a")
    splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N), "b")
    ids = token_ids(tiny_llama)
    causal_lm_loss(tiny_llama, ids, None, ids).backward()
    grads = {name for name, p in tiny_llama.named_parameters() if p.grad is not None}
    assert grads == {"adapter_prompt_tuning.prompt_embeddings.b"}
    assert tiny_llama.adapter_prompt_tuning.prompt_embeddings["b"].grad.abs().sum() > 0


def test_merge_is_refused_with_the_reason(tiny_llama):
    splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N))
    for merge in (splice.merge_adapter, splice.merge_and_unload):
        with pytest.raises(splice.AdapterError, match="it changes the input \\(virtual tokens\\), "
                                                      "there is no weight to fold it into"):
            merge(tiny_llama)


def hooks(model) -> int:
    body = model.base_model
    return len(body._forward_pre_hooks) + len(body._forward_hooks)


def test_failed_first_attach_leaves_no_layer_and_no_hooks(tiny_llama, tmp_path):
    before = snapshot(tiny_llama)
    with pytest.raises(splice.AdapterError):
        splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N),
                      weights={"prompt_embeddings": torch.zeros(N + 1, 32)})
    assert_same_snapshot(before, snapshot(tiny_llama))
    assert hooks(tiny_llama) == 0 and not hasattr(tiny_llama, "adapter_prompt_tuning")
    with pytest.raises(OSError):  # fails while creating the tokens, after the hooks went in
        splice.attach(tiny_llama, text_config(N, str(tmp_path / "no-such-tokenizer")))
    assert_same_snapshot(before, snapshot(tiny_llama))
    assert hooks(tiny_llama) == 0 and not hasattr(tiny_llama, "adapter_prompt_tuning")


def test_a_file_for_another_width_is_refused_and_changes_nothing(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    splice.attach(model, splice.PromptTuningConfig(num_virtual_tokens=N))
    splice.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "token_dim": 48}))
    before = snapshot(tiny_llama)
    with pytest.raises(splice.AdapterError, match="token_dim=48 but this model has token_dim=32"):
        splice.load_adapter(tiny_llama, tmp_path)
    assert_same_snapshot(before, snapshot(tiny_llama))
    assert hooks(tiny_llama) == 0


def test_delete_last_adapter_removes_layer_and_hooks_and_restores_the_base(tiny_llama):
    ids = token_ids(tiny_llama)
    before = snapshot(tiny_llama)
    expected = tiny_llama(ids).logits
    splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N), "a")
    splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N), "b")
    splice.delete_adapter(tiny_llama, "a")
    assert hooks(tiny_llama) == 2
    splice.delete_adapter(tiny_llama, "b")
    assert_same_snapshot(before, snapshot(tiny_llama))
    assert hooks(tiny_llama) == 0
    assert torch.equal(tiny_llama(ids).logits, expected)


def test_lora_and_prompt_together_keep_lora_file_keys(tiny_llama, tmp_path):
    splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N), "prompt")
    splice.attach(tiny_llama, splice.LoRAConfig(rank=2, target_modules="all-linear"), "lora")
    splice.save_adapter(tiny_llama, tmp_path, "lora")
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    # 'all-linear' skipped the adapter's own module, and file keys are the plain model paths.
    assert all(k.startswith("base_model.model.model.layers.") for k in keys) and len(keys) == 2 * 7 * 2


def test_merge_and_unload_of_lora_also_takes_an_inactive_prompt_off(tiny_llama):
    splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N), "prompt")
    splice.attach(tiny_llama, splice.LoRAConfig(rank=2, target_modules=["q_proj"]), "lora")
    with torch.no_grad():
        tiny_llama.model.layers[0].self_attn.q_proj.lora_B["lora"].weight.normal_()
    ids = token_ids(tiny_llama)
    expected = tiny_llama(ids).logits
    plain = splice.merge_and_unload(tiny_llama)
    assert hooks(plain) == 0 and not hasattr(plain, "adapter_prompt_tuning")
    torch.testing.assert_close(plain(ids).logits, expected, atol=ATOL, rtol=0)


def test_a_deep_copy_carries_its_own_working_adapter(tiny_llama):
    splice.attach(tiny_llama, splice.PromptTuningConfig(num_virtual_tokens=N))
    twin = copy.deepcopy(tiny_llama)
    ids = token_ids(tiny_llama)
    with torch.no_grad():
        twin.adapter_prompt_tuning.prompt_embeddings["default"].add_(1.0)
        assert not torch.allclose(twin(ids).logits, tiny_llama(ids).logits, atol=1e-3)
        splice.delete_adapter(twin, "default")
        assert hooks(twin) == 0 and hooks(tiny_llama) == 2


def test_training_lowers_the_loss():
    """30 AdamW steps on the virtual tokens alone teach a frozen model to continue every prompt
    with token 7. (The random model is initialised with std 0.2, not 0.02, so that its frozen head
    can express a confident prediction at all.)"""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, initializer_range=0.2))
    splice.attach(model, splice.PromptTuningConfig(num_virtual_tokens=N))
    ids = torch.randint(0, 128, (4, 12))
    ids[:, 6:] = 7
    labels = ids.masked_fill(torch.arange(12) < 6, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    losses = []
    for _ in range(30):
        loss = causal_lm_loss(model, ids, None, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::6]


def test_config_mistakes_are_named():
    with pytest.raises(splice.ConfigError, match="target_modules"):
        splice.PromptTuningConfig(target_modules=["q_proj"])
    with pytest.raises(splice.ConfigError, match="init_text and tokenizer_name_or_path"):
        splice.PromptTuningConfig(init="text", init_text="hello")
    with pytest.raises(splice.ConfigError, match="num_virtual_tokens=0"):
        splice.PromptTuningConfig(num_virtual_tokens=0)
    with pytest.raises(splice.ConfigError, match="encoder-decoder"):
        splice.PromptTuningConfig(num_transformer_submodules=2)


# -- SmolLM2 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_pair(smollm2, tmp_path_factory):
    """(splice model with a peft-made adapter loaded, the peft model, its folder, tokenizer)."""
    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("smollm2-prompt")
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), PeftPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=8)).eval()
    peft_model.save_pretrained(folder)
    ours = copy.deepcopy(model)
    splice.load_adapter(ours, folder)
    return ours, peft_model, folder, tokenizer


@pytest.mark.integration
def test_smollm2_peft_file_gives_equal_logits_and_greedy_tokens(smol_pair):
    ours, peft_model, _, tokenizer = smol_pair
    prompt = "Tell me a fun fact."
    (completion,) = greedy_completions(ours, tokenizer, [prompt], max_new_tokens=8, progress=False)
    with splice.disable_adapters(ours):
        (base_completion,) = greedy_completions(ours, tokenizer, [prompt], max_new_tokens=8,
                                                progress=False)
    ids = torch.tensor([render_prompt(tokenizer, prompt)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(input_ids=ids).logits[:, 8:],
                                   atol=1e-4, rtol=0)
    reference = peft_greedy(peft_model, ids, 8)[0, ids.shape[1]:].tolist()
    expected = tokenizer.decode(until_eos(reference, tokenizer.eos_token_id),
                                skip_special_tokens=True).strip()
    assert completion == expected
    assert completion != base_completion  # so the tokens show the adapter at work


@pytest.mark.integration
def test_smollm2_splice_file_loads_in_peft_with_equal_logits(smol_pair, smollm2, tmp_path):
    ours, _, _, tokenizer = smol_pair
    splice.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(smollm2[0]), tmp_path).eval()
    ids = torch.tensor([render_prompt(tokenizer, "Name a colour.")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits[:, 8:], ours(ids).logits,
                                   atol=1e-4, rtol=0)

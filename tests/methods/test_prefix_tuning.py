"""Prefix tuning against peft (files both ways, with and without the projection MLP, logits,
greedy tokens, loss), against closed forms (a text-initialised prefix is the base model reading
that text; a zero prefix scales each head's attention by Z/(Z + n)), and splice's life cycle.

Tolerance 1e-5 absolute where two code paths meet; the same code path is compared exactly.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft import PrefixTuningConfig as PeftPrefixTuningConfig
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
INIT_TEXT = "classify the sentiment"


@pytest.fixture
def models_by_kind(tiny_llama, tiny_gpt2):
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory) -> str:
    """A word-level tokenizer folder for the tiny models' vocabulary that adds a BOS (id 1)."""
    words = ["<unk>", "<s>"] + [f"w{i}" for i in range(40)] + ["classify", "the", "sentiment"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = tmp_path_factory.mktemp("word-tokenizer")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")
    fast.save_pretrained(folder)
    return str(folder)


def text_ids(count: int) -> torch.Tensor:
    """INIT_TEXT's ids, [<s> classify the sentiment], cut or repeated to `count`."""
    return torch.tensor(([1, 42, 43, 44] * count)[:count])


def text_config(count: int, tokenizer: str) -> splice.PrefixTuningConfig:
    return splice.PrefixTuningConfig(num_virtual_tokens=count, init="text", init_text=INIT_TEXT,
                                     tokenizer_name_or_path=tokenizer)


def peft_made(base, folder, **kwargs):
    """A peft prefix-tuning model (trainable, so a projection file holds the MLP's output), saved."""
    peft_model = get_peft_model(copy.deepcopy(base), PeftPrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, **kwargs)).eval()
    peft_model.save_pretrained(folder)
    return peft_model


def left_padded_mask(ids: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return mask


@torch.no_grad()
def peft_greedy(peft_model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full forward passes of the peft model, no cache: the reference for
    generate. (peft 0.21's own generate drops the prefix under transformers 5: it passes it as
    `past_key_values`, which the model's `cache` argument overrides.)"""
    out = ids
    for _ in range(new_tokens):
        step = peft_model(input_ids=out).logits[:, -1]                # (B, V)
        out = torch.cat([out, step.argmax(-1, keepdim=True)], dim=1)
    return out


def until_eos(row: list[int], eos: int) -> list[int]:
    return row[:row.index(eos) + 1] if eos in row else row


PEFT_KWARGS = {"flat": {}, "projection": {"prefix_projection": True, "encoder_hidden_size": 16}}


# -- peft interop -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", PEFT_KWARGS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_made_file_loads_with_equal_logits(models_by_kind, kind, variant, tmp_path):
    base = models_by_kind[kind]
    peft_model = peft_made(base, tmp_path, **PEFT_KWARGS[variant])
    ids = token_ids(base)
    mask = left_padded_mask(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of peft's config is understood
        splice.load_adapter(base, tmp_path)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(base(ids, attention_mask=mask).logits, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", PEFT_KWARGS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_splice_file_loads_in_peft_with_equal_logits_and_peft_keys(models_by_kind, kind, variant,
                                                                   tmp_path):
    base = models_by_kind[kind]
    model = copy.deepcopy(base)
    splice.attach(model, splice.PrefixTuningConfig(num_virtual_tokens=N, **PEFT_KWARGS[variant]))
    splice.save_adapter(model, tmp_path / "ours")
    peft_made(base, tmp_path / "theirs", **PEFT_KWARGS[variant])
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("peft_version", "auto_mapping"):  # peft bookkeeping only
        theirs.pop(key)
    assert ours == theirs
    layer = model.adapter_prefix_tuning
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        assert list(f.keys()) == ["prompt_embeddings"]
        # The flat prefix, or with the projection the MLP's output: (n, layers·2·kv heads·head dim)
        assert torch.equal(f.get_tensor("prompt_embeddings"), layer.flat_prefix("default").detach())
    width = ours["num_layers"] * 2 * ours["token_dim"]
    assert layer.flat_prefix("default").shape == (N, width)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    ids = token_ids(base)
    mask = left_padded_mask(ids)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids, attention_mask=mask).logits,
                                   model(ids, attention_mask=mask).logits, atol=ATOL, rtol=0)


def test_token_dim_is_kv_heads_times_head_dim_as_peft_records_it(tiny_llama, tmp_path):
    peft_model = peft_made(tiny_llama, tmp_path)
    splice.attach(tiny_llama, splice.PrefixTuningConfig(num_virtual_tokens=N))
    config = splice.list_adapters(tiny_llama)["default"]
    peft_config = peft_model.peft_config["default"]
    # tiny Llama: 4 query heads, 2 KV heads of 8 dims -> 16 wide keys and values per layer
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)
    assert (peft_config.token_dim, peft_config.num_attention_heads) == (16, 2)


@pytest.mark.parametrize("variant", PEFT_KWARGS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_generation_gives_peft_tokens(models_by_kind, kind, variant, tmp_path):
    base = models_by_kind[kind]
    peft_model = peft_made(base, tmp_path, **PEFT_KWARGS[variant])
    splice.load_adapter(base, tmp_path)
    ids = token_ids(base, batch=2, length=5, seed=3)
    generate = lambda: base.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ours = generate()[:, 5:].tolist()
        with splice.disable_adapters(base):
            plain = generate()[:, 5:].tolist()
    reference = peft_greedy(peft_model, ids, 8)[:, 5:].tolist()
    eos = base.generation_config.eos_token_id
    assert [until_eos(r, eos) for r in ours] == [until_eos(r, eos) for r in reference]
    assert ours != plain  # so the tokens show the adapter at work


def test_loss_equals_the_models_own_and_peft(tiny_llama, tmp_path):
    peft_model = peft_made(tiny_llama, tmp_path)
    splice.load_adapter(tiny_llama, tmp_path)
    ids = token_ids(tiny_llama)
    mask = left_padded_mask(ids)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        chunked = causal_lm_loss(tiny_llama, ids, mask, labels, chunk_size=3)
        own = tiny_llama(ids, attention_mask=mask, labels=labels).loss
        theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(chunked, own, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, theirs, atol=ATOL, rtol=0)


# -- what holds at init (closed forms) ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("count", [2, 6])  # cut and repeated
def test_text_init_is_the_base_model_reading_the_text(models_by_kind, kind, count, word_tokenizer):
    base = models_by_kind[kind]
    ids = token_ids(base)
    mask = left_padded_mask(ids)
    prefix = text_ids(count).expand(ids.shape[0], count)
    with torch.no_grad():
        full_mask = torch.cat([torch.ones_like(prefix), mask], dim=1)
        expected = base(torch.cat([prefix, ids], dim=1), attention_mask=full_mask).logits[:, count:]
        assert not torch.allclose(base(ids, attention_mask=mask).logits, expected, atol=1e-3)
    splice.attach(base, text_config(count, word_tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(base(ids, attention_mask=mask).logits, expected, atol=ATOL, rtol=0)


def first_attention_output(model, ids) -> torch.Tensor:
    """Layer 0's attention output before o_proj, per head: (B, T, heads, head dim)."""
    seen = []
    o_proj = model.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen[0].unflatten(-1, (model.config.num_attention_heads, -1))


def test_zero_init_scales_each_heads_attention_by_z_over_z_plus_n(tiny_llama):
    """n zero keys score 0 and bring zero values: o = o_base·Z/(Z + n), so 1/c − 1 = n/Z, and
    the ratio of (1/c − 1) between two prefix lengths is the ratio of the lengths."""
    ids = token_ids(tiny_llama)
    base = first_attention_output(tiny_llama, ids)                      # (B, T, H, hd)
    inverse = {}
    for n in (2, 5):
        model = copy.deepcopy(tiny_llama)
        splice.attach(model, splice.PrefixTuningConfig(num_virtual_tokens=n, init="zero"))
        out = first_attention_output(model, ids)
        c = (out * base).sum(-1) / (base * base).sum(-1)                 # (B, T, H)
        torch.testing.assert_close(out, c[..., None] * base, atol=1e-5, rtol=0)
        assert bool((c < 1).all()) and bool((c > 0).all())
        inverse[n] = 1 / c - 1
    torch.testing.assert_close(inverse[2] * 5, inverse[5] * 2, atol=0, rtol=1e-4)


def test_prompt_and_prefix_together_read_prefix_text_then_prompt_text(tiny_llama, word_tokenizer):
    ids = token_ids(tiny_llama)
    prefix_then_prompt = torch.cat([text_ids(3), text_ids(2)]).expand(ids.shape[0], 5)
    with torch.no_grad():
        expected = tiny_llama(torch.cat([prefix_then_prompt, ids], dim=1)).logits[:, 5:]
    splice.attach(tiny_llama, text_config(3, word_tokenizer), "prefix")
    splice.attach(tiny_llama, splice.PromptTuningConfig(
        num_virtual_tokens=2, init="text", init_text=INIT_TEXT, tokenizer_name_or_path=word_tokenizer),
        "prompt")
    splice.set_active_adapters(tiny_llama, ["prompt", "prefix"])
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(ids).logits, expected, atol=ATOL, rtol=0)
        step = tiny_llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=3, do_sample=False, pad_token_id=0)
    reference = torch.cat([prefix_then_prompt, ids], dim=1)
    with torch.no_grad(), splice.disable_adapters(tiny_llama):
        for _ in range(3):
            next_token = tiny_llama(reference).logits[:, -1].argmax(-1, keepdim=True)
            reference = torch.cat([reference, next_token], dim=1)
    eos = tiny_llama.generation_config.eos_token_id
    assert ([until_eos(r, eos) for r in step[:, ids.shape[1]:].tolist()]
            == [until_eos(r, eos) for r in reference[:, -3:].tolist()])


# -- life cycle ---------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True])
def test_gradients_reach_only_the_active_prefix(tiny_llama, projection):
    config = splice.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=projection)
    splice.attach(tiny_llama, config, "a")
    splice.attach(tiny_llama, config, "b")
    ids = token_ids(tiny_llama)
    tiny_llama.train()
    causal_lm_loss(tiny_llama, ids, None, ids).backward()
    grads = {name for name, p in tiny_llama.named_parameters() if p.grad is not None}
    expected = {"adapter_prefix_tuning.prefix_embeddings.b"}
    if projection:
        expected |= {f"adapter_prefix_tuning.prefix_mlp.b.{i}.{w}" for i in (0, 2)
                     for w in ("weight", "bias")}
    assert grads == expected
    assert all(p.grad.abs().sum() > 0 for p in tiny_llama.parameters() if p.grad is not None)


def test_a_loaded_projection_file_trains_on_the_flat_prefix(tiny_llama, tmp_path):
    model = copy.deepcopy(tiny_llama)
    splice.attach(model, splice.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True))
    splice.save_adapter(model, tmp_path)
    splice.load_adapter(tiny_llama, tmp_path)
    trainable = {n: tuple(p.shape) for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable == {"adapter_prefix_tuning.prefix_embeddings.default": (N, 2 * 2 * 16)}
    ids = token_ids(tiny_llama)
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, model(ids).logits)


def test_merge_is_refused_with_the_reason(tiny_llama):
    splice.attach(tiny_llama, splice.PrefixTuningConfig(num_virtual_tokens=N))
    with pytest.raises(splice.AdapterError, match="it changes the input \\(virtual tokens\\), "
                                                  "there is no weight to fold it into"):
        splice.merge_adapter(tiny_llama)


def hooks(model) -> int:
    body = model.base_model
    return len(body._forward_pre_hooks) + len(body._forward_hooks)


def test_a_file_for_another_depth_is_refused_and_changes_nothing(tiny_llama, tmp_path):
    splice.attach(tiny_llama, splice.PrefixTuningConfig(num_virtual_tokens=N), "first")
    model = copy.deepcopy(tiny_llama)
    splice.save_adapter(model, tmp_path, "first")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_layers": 3}))
    before = snapshot(tiny_llama)
    with pytest.raises(splice.AdapterError, match="num_layers=3 but this model has num_layers=2"):
        splice.load_adapter(tiny_llama, tmp_path, "second")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(splice.AdapterError, match="shape"):  # fails inside the transaction
        splice.attach(tiny_llama, splice.PrefixTuningConfig(num_virtual_tokens=N + 1), "second",
                      weights={"prompt_embeddings": torch.zeros(N, 64)})
    assert_same_snapshot(before, snapshot(tiny_llama))
    assert hooks(tiny_llama) == 2


def test_delete_last_adapter_removes_layer_and_hooks_and_restores_the_base(tiny_gpt2):
    ids = token_ids(tiny_gpt2)
    before = snapshot(tiny_gpt2)
    expected = tiny_gpt2(ids).logits
    splice.attach(tiny_gpt2, splice.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True))
    splice.delete_adapter(tiny_gpt2, "default")
    assert_same_snapshot(before, snapshot(tiny_gpt2))
    assert hooks(tiny_gpt2) == 0 and not hasattr(tiny_gpt2, "adapter_prefix_tuning")
    assert torch.equal(tiny_gpt2(ids).logits, expected)


def test_gradient_checkpointing_is_refused_in_training(tiny_llama):
    splice.attach(tiny_llama, splice.PrefixTuningConfig(num_virtual_tokens=N))
    tiny_llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_llama.train()
    ids = token_ids(tiny_llama)
    with pytest.raises(splice.AdapterError, match="gradient checkpointing"):
        causal_lm_loss(tiny_llama, ids, None, ids)
    with torch.no_grad():  # no backward to replay: the cache survives, so this is fine
        tiny_llama(ids)


@pytest.mark.parametrize("projection", [False, True])
def test_training_lowers_the_loss(projection):
    """30 AdamW steps on the prefix alone teach a frozen model to continue every prompt with
    token 7 (the random model has init std 0.2 so that its frozen head can be confident)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, initializer_range=0.2))
    splice.attach(model, splice.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=projection))
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
    with pytest.raises(splice.ConfigError, match="prefix_projection"):
        splice.PrefixTuningConfig(init="text", init_text="x", tokenizer_name_or_path="t",
                                  prefix_projection=True)
    with pytest.raises(splice.ConfigError, match="init='kaiming'"):
        splice.PrefixTuningConfig(init="kaiming")
    with pytest.raises(splice.ConfigError, match="layers_to_transform"):
        splice.PrefixTuningConfig(layers_to_transform=[0])


def test_peft_init_weights_round_trips_as_zero_init():
    config = splice.PrefixTuningConfig(init="zero", token_dim=16, num_layers=2)
    data = config.to_peft_dict()
    assert data["init_weights"] == "zero" and "init" not in data and "init_text" not in data
    assert splice.PrefixTuningConfig.from_peft_dict(data) == config


# -- SmolLM2 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol_pair(smollm2, tmp_path_factory):
    """(splice model with a peft-made adapter loaded, the peft model, tokenizer)."""
    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("smollm2-prefix")
    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(model), PeftPrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=8)).eval()
    with torch.no_grad():  # keys and values on the scale of the model's own
        peft_model.prompt_encoder["default"].embedding.weight.mul_(0.5)
    peft_model.save_pretrained(folder)
    ours = copy.deepcopy(model)
    splice.load_adapter(ours, folder)
    return ours, peft_model, tokenizer


@pytest.mark.integration
def test_smollm2_peft_file_gives_equal_logits_and_greedy_tokens(smol_pair):
    ours, peft_model, tokenizer = smol_pair
    prompt = "Tell me a fun fact."
    (completion,) = greedy_completions(ours, tokenizer, [prompt], max_new_tokens=8, progress=False)
    with splice.disable_adapters(ours):
        (base_completion,) = greedy_completions(ours, tokenizer, [prompt], max_new_tokens=8,
                                                progress=False)
    ids = torch.tensor([render_prompt(tokenizer, prompt)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, peft_model(input_ids=ids).logits,
                                   atol=1e-4, rtol=0)
    reference = peft_greedy(peft_model, ids, 8)[0, ids.shape[1]:].tolist()
    expected = tokenizer.decode(until_eos(reference, tokenizer.eos_token_id),
                                skip_special_tokens=True).strip()
    assert completion == expected
    assert completion != base_completion  # so the tokens show the adapter at work


@pytest.mark.integration
def test_smollm2_splice_file_loads_in_peft_with_equal_logits(smol_pair, smollm2, tmp_path):
    ours, _, tokenizer = smol_pair
    splice.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(smollm2[0]), tmp_path).eval()
    ids = torch.tensor([render_prompt(tokenizer, "Name a colour.")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours(ids).logits, atol=1e-4, rtol=0)

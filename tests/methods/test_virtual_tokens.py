"""What prompt and prefix tuning share: virtual tokens survive padding and KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

import splice
from helpers import token_ids
from test_prompt_tuning import ATOL, N, left_padded_mask, models_by_kind, until_eos  # noqa: F401

CONFIGS = [splice.PromptTuningConfig, splice.PrefixTuningConfig]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("config_cls", CONFIGS)
def test_a_left_padded_batch_generates_what_each_row_generates_alone(models_by_kind, kind, config_cls):
    """Padding moves neither the virtual tokens nor the positions of a row's real tokens."""
    base = models_by_kind[kind]
    splice.attach(base, config_cls(num_virtual_tokens=N))
    long, short = token_ids(base, batch=1, length=6, seed=4), token_ids(base, batch=1, length=3, seed=5)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=long.dtype), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    generate = lambda ids, mask: base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                               do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    with torch.no_grad():
        together = generate(batch, mask).tolist()
        alone = [generate(row, torch.ones_like(row))[0].tolist() for row in (long, short)]
    eos = base.generation_config.eos_token_id
    assert [until_eos(r, eos) for r in together] == [until_eos(r, eos) for r in alone]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("config_cls", CONFIGS)
def test_a_cached_step_equals_the_full_forward(models_by_kind, kind, config_cls):
    """Continuing a KV cache (the virtual tokens already in it) with generate-style explicit
    positions and a left-padded mask gives the full forward's last logits."""
    base = models_by_kind[kind]
    splice.attach(base, config_cls(num_virtual_tokens=N))
    ids = token_ids(base)
    mask = left_padded_mask(ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = base(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        first = base(ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                     use_cache=True)
        step = base(ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                    cache=first.cache).logits[:, -1]
    torch.testing.assert_close(step, full, atol=ATOL, rtol=0)

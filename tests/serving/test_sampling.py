"""Token choice and text release: closed-form references (argmax, the nucleus set) and a byte
tokenizer, where one character can span two tokens."""

from __future__ import annotations

import pytest
import torch

from splice.config.base import ConfigError
from splice.serving.sampling import SamplingParams, TextStream, next_token


def byte_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_temperature_zero_is_argmax():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    assert next_token(logits, SamplingParams(temperature=0), torch.Generator()) == 1


def test_top_p_samples_only_from_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps {0, 1} (0.5 < 0.7 <= 0.8)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = SamplingParams(temperature=1.0, top_p=0.7)
    gen = torch.Generator().manual_seed(0)
    draws = [next_token(logits, params, gen) for _ in range(400)]
    assert set(draws) == {0, 1}
    assert 0.5 < draws.count(0) / len(draws) < 0.75   # 0.5 / 0.8 = 0.625 expected


def test_the_same_seed_draws_the_same_tokens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=1.0, seed=5)
    first = [next_token(logits, params, g) for g in [params.generator()] for _ in range(20)]
    gen = params.generator()
    assert [next_token(logits, params, gen) for _ in range(20)] == first


def test_a_split_character_is_held_until_complete(tokenizer):
    stream = TextStream(tokenizer, stop=())
    first, second = byte_ids(tokenizer, "é")
    assert stream.push(first) == ""
    assert stream.push(second) == "é"


def test_a_stop_string_across_tokens_is_cut_and_never_released(tokenizer):
    stream = TextStream(tokenizer, stop=("END",))
    released = "".join(stream.push(t) for t in byte_ids(tokenizer, "abcEN"))
    assert released == "abc"                     # "EN" is held: it could start "END"
    assert stream.push(byte_ids(tokenizer, "D")[0]) == "" and stream.stopped
    assert stream.text == "abc"


def test_flush_releases_what_was_held(tokenizer):
    stream = TextStream(tokenizer, stop=("xyz",))
    released = "".join(stream.push(t) for t in byte_ids(tokenizer, "hello"))
    assert released + stream.flush() == "hello"


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -1),
                                          ("top_p", 1.5), ("stop", ("",))])
def test_bad_sampling_parameters_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field if field != "stop" else "stop"):
        SamplingParams(**{field: value})

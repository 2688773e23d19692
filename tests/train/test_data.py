"""splice.train.data and splice.train.batching: shapes, loss masks, errors, length bucketing."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from splice.train.batching import (
    collate,
    length_bucketed_batches,
    padding_waste,
    plain_batches,
)
from splice.train.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    data_fingerprint,
    encode_record,
    load_jsonl,
    render_prompt,
)

# --- a tiny word-level tokenizer: every word one id, so expected ids are easy to write -------

_SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
_WORDS = ("system user assistant be kind hi hello there more sure thing the cat sat on mat "
          "two plus is four a b c d e f g h").split()
# Like SmolLM2's: a default system prompt when the chat does not open with one.
_TINY_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}<|im_start|>system be kind<|im_end|>{% endif %}"
    "<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def _tiny_tokenizer(*, chat: bool) -> PreTrainedTokenizerFast:
    """WordLevel over _WORDS; adds <s> in front of plain text, as Llama's tokenizer does."""
    vocab = {token: index for index, token in enumerate(_SPECIALS + _WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tokenizer.chat_template = _TINY_TEMPLATE if chat else None
    return tokenizer


@pytest.fixture(scope="module")
def tiny() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer(chat=False)


@pytest.fixture(scope="module")
def tiny_chat() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer(chat=True)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _supervised(example: Example) -> list[int]:
    pairs = zip(example.input_ids, example.labels)
    return [token for token, label in pairs if label != IGNORE_INDEX]


def _write(tmp_path: Path, lines: list, name: str = "data.jsonl") -> Path:
    """Objects are JSON-encoded; strings are written as they are (for malformed lines)."""
    path = tmp_path / name
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                              for line in lines) + "\n", encoding="utf-8")
    return path


def _chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


# --- masks, tiny tokenizer -------------------------------------------------------------------


def test_text_supervises_every_token_with_bos_and_eos(tiny):
    shape, example = encode_record({"text": "the cat sat"}, tiny)
    assert shape == "text"
    expected = [tiny.bos_token_id] + _ids(tiny, "the cat sat") + [tiny.eos_token_id]
    assert example.input_ids == expected
    assert example.labels == expected


def test_prompt_completion_without_template_supervises_completion_and_eos(tiny):
    shape, example = encode_record({"prompt": "two plus two is", "completion": " four"}, tiny)
    assert shape == "prompt_completion"
    prompt_ids = render_prompt(tiny, "two plus two is")
    assert prompt_ids == [tiny.bos_token_id] + _ids(tiny, "two plus two is")
    assert example.input_ids[:len(prompt_ids)] == prompt_ids
    assert example.labels[:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert _supervised(example) == _ids(tiny, "four") + [tiny.eos_token_id]


def test_prompt_completion_with_template_is_a_user_then_assistant_turn(tiny_chat):
    _, example = encode_record({"prompt": "two plus two is", "completion": "four"}, tiny_chat)
    prompt_ids = render_prompt(tiny_chat, "two plus two is")
    assert tiny_chat.decode(prompt_ids) == (
        "<|im_start|> system be kind <|im_end|> <|im_start|> user two plus two is <|im_end|> "
        "<|im_start|> assistant")
    assert example.input_ids[:len(prompt_ids)] == prompt_ids
    end_of_turn = tiny_chat.convert_tokens_to_ids("<|im_end|>")
    assert _supervised(example) == _ids(tiny_chat, "four") + [end_of_turn]


def test_chat_supervises_each_assistant_turn_and_its_end_token_only(tiny_chat):
    record = _chat(("user", "hi"), ("assistant", "hello there"), ("user", "more"),
                   ("assistant", "sure thing"))
    shape, example = encode_record(record, tiny_chat)
    assert shape == "chat"
    end_of_turn = tiny_chat.convert_tokens_to_ids("<|im_end|>")
    expected = _ids(tiny_chat, "hello there") + [end_of_turn] + _ids(tiny_chat, "sure thing") + [
        end_of_turn]
    assert _supervised(example) == expected
    # The default system prompt and the headers are context: the first supervised token is
    # "hello", right after "<|im_start|> assistant".
    first = example.labels.index(_ids(tiny_chat, "hello")[0])
    assert tiny_chat.decode(example.input_ids[first - 2:first]) == "<|im_start|> assistant"


def test_chat_with_own_system_prompt_does_not_get_the_default(tiny_chat):
    record = _chat(("system", "be kind"), ("user", "hi"), ("assistant", "hello"))
    _, example = encode_record(record, tiny_chat)
    assert tiny_chat.decode(example.input_ids).count("system") == 1
    assert _supervised(example) == _ids(tiny_chat, "hello <|im_end|>")


def test_chat_that_opens_with_the_assistant_is_refused(tiny_chat):
    with pytest.raises(DataError, match="opens with an assistant turn"):
        encode_record(_chat(("assistant", "hello"), ("user", "hi")), tiny_chat)


def test_template_that_rewrites_earlier_turns_is_refused():
    tokenizer = _tiny_tokenizer(chat=True)
    # Earlier assistant turns lose their content (as reasoning templates drop old thoughts).
    tokenizer.chat_template = _TINY_TEMPLATE.replace(
        "{{ m['content'] }}",
        "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}")
    record = _chat(("user", "hi"), ("assistant", "hello"), ("user", "more"), ("assistant", "sure"))
    with pytest.raises(DataError, match=r"messages\[1\] \(assistant\) as an extension"):
        encode_record(record, tokenizer)


def test_chat_needs_a_template(tiny):
    with pytest.raises(DataError, match="chat template"):
        encode_record(_chat(("user", "hi"), ("assistant", "hello")), tiny)


# --- loading: stats, errors, truncation ------------------------------------------------------


def test_load_counts_shapes_and_tokens(tiny_chat, tmp_path):
    path = _write(tmp_path, [{"text": "the cat"}, "", "   ",
                             {"prompt": "hi", "completion": "hello", "id": 7},
                             _chat(("user", "hi"), ("assistant", "hello"))])
    dataset = load_jsonl(path, tiny_chat, max_len=64)
    stats = dataset.stats
    assert len(dataset) == 3 and stats.lines_read == 3
    assert stats.shapes == {"chat": 1, "prompt_completion": 1, "text": 1}
    assert stats.total_tokens == sum(len(e) for e in dataset.examples)
    assert stats.supervised_tokens == sum(e.num_supervised for e in dataset.examples)
    # text: "the cat </s>" after <s>; pairs: "hello <|im_end|>" each.
    assert stats.supervised_tokens == 3 + 2 + 2


MALFORMED = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ("{}", "empty object"),
    ({"input": "x"}, "none of the known keys"),
    ({"text": 3}, "'text' must be a string, got int"),
    ({"text": "  "}, "'text' is empty"),
    ({"prompt": "hi"}, "no 'completion'"),
    ({"text": "hi", "prompt": "a", "completion": "b"}, "mixes shapes"),
    ({"messages": "hi"}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\].content must be a string"),
    (_chat(("user", "hi")), "no 'assistant' message"),
]


@pytest.mark.parametrize("bad, message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_line_names_file_line_and_problem(tiny_chat, tmp_path, bad, message):
    path = _write(tmp_path, [{"text": "the cat"}, "", bad])
    with pytest.raises(DataError, match=message) as caught:
        load_jsonl(path, tiny_chat, max_len=64)
    assert str(caught.value).startswith(f"{path}:3: ")
    assert isinstance(caught.value, ValueError)


def test_skip_bad_skips_and_counts(tiny_chat, tmp_path):
    path = _write(tmp_path, ["{oops", {"text": "the cat"}, {"text": 5}, {"text": "a b"}])
    dataset = load_jsonl(path, tiny_chat, max_len=64, skip_bad=True)
    assert len(dataset) == 2
    assert dataset.stats.skipped == 2 and dataset.stats.lines_read == 4


def test_a_file_with_nothing_usable_is_an_error(tiny_chat, tmp_path):
    path = _write(tmp_path, ["{oops", ""])
    with pytest.raises(DataError, match="no usable examples"):
        load_jsonl(path, tiny_chat, max_len=64, skip_bad=True)


def test_missing_file_is_a_clear_error(tiny, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        load_jsonl(missing, tiny, max_len=64)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        data_fingerprint(tmp_path)


def test_truncation_keeps_the_start_and_drops_what_teaches_nothing(tiny, tmp_path):
    long_text = " ".join(["a b c d"] * 5)  # 20 words
    path = _write(tmp_path, [
        {"text": long_text},                                        # truncated, kept
        {"prompt": "a b c d e f g h", "completion": "the cat"},     # truncated inside prompt
        {"text": "the cat"},                                        # fits: <s> the cat </s>
    ])
    dataset = load_jsonl(path, tiny, max_len=6)
    stats = dataset.stats
    assert stats.truncated == 2 and stats.dropped_unsupervised == 1
    assert len(dataset) == 2
    assert all(len(example) <= 6 for example in dataset.examples)
    assert dataset.examples[0].input_ids == [tiny.bos_token_id] + _ids(tiny, "a b c d a")


def test_max_len_must_leave_a_target(tiny, tmp_path):
    with pytest.raises(ValueError, match="max_len"):
        load_jsonl(_write(tmp_path, [{"text": "a"}]), tiny, max_len=1)


def test_fingerprint_is_sha256_of_the_bytes(tmp_path):
    path = _write(tmp_path, [{"text": "the cat"}])
    assert data_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    before = data_fingerprint(path)
    path.write_text(path.read_text() + "\n")
    assert data_fingerprint(path) != before


# --- batching --------------------------------------------------------------------------------


def _numbered(lengths: list[int]) -> list[Example]:
    """Example i starts with token i + 1 (0 is padding), so a batch row names its example."""
    return [Example([index + 1] + [7] * (length - 1), [IGNORE_INDEX] + [7] * (length - 1))
            for index, length in enumerate(lengths)]


def test_collate_pads_right_with_ignored_labels():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long
    assert (batch.num_tokens, batch.num_supervised) == (4, 2)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=120),
       batch_size=st.integers(1, 9), chunk_batches=st.integers(1, 5),
       seed=st.integers(0, 2**31), epoch=st.integers(0, 5))
def test_bucketed_batches_cover_each_example_once_deterministically(
        lengths, batch_size, chunk_batches, seed, epoch):
    examples = _numbered(lengths)
    def make():
        return length_bucketed_batches(examples, batch_size, seed=seed, epoch=epoch,
                                       pad_token_id=0, chunk_batches=chunk_batches)

    batches = make()
    seen = sorted(int(row) - 1 for batch in batches for row in batch.input_ids[:, 0])
    assert seen == list(range(len(examples)))
    assert all(1 <= batch.size <= batch_size for batch in batches)
    for batch in batches:
        assert (batch.labels[batch.attention_mask == 0] == IGNORE_INDEX).all()
        assert batch.num_tokens == sum(len(examples[int(row) - 1]) for row in batch.input_ids[:, 0])
    again = make()
    assert all(torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
               for a, b in zip(batches, again, strict=True))


def test_epochs_and_seeds_change_the_order():
    examples = _numbered([random.Random(0).randint(1, 50) for _ in range(200)])

    def first_rows(**seeds):
        return [b.input_ids[:, 0].tolist()
                for b in length_bucketed_batches(examples, 8, pad_token_id=0, **seeds)]

    assert first_rows(seed=0, epoch=0) != first_rows(seed=0, epoch=1)
    assert first_rows(seed=0, epoch=0) != first_rows(seed=1, epoch=0)


def test_bucketing_wastes_less_padding_than_random_batches():
    rng = random.Random(0)
    examples = _numbered([rng.choice([rng.randint(4, 16), rng.randint(100, 300)])
                          for _ in range(400)])
    shuffled = list(examples)
    rng.shuffle(shuffled)
    random_waste = padding_waste(plain_batches(shuffled, 8, pad_token_id=0))
    bucketed_waste = padding_waste(length_bucketed_batches(examples, 8, seed=0, epoch=0,
                                                           pad_token_id=0))
    assert random_waste > 0.3
    assert bucketed_waste < 0.1
    assert padding_waste([]) == 0.0


def test_plain_batches_keep_order():
    examples = _numbered([3, 1, 4, 1, 5])
    batches = plain_batches(examples, 2, pad_token_id=0)
    assert [b.input_ids[:, 0].tolist() for b in batches] == [[1, 2], [3, 4], [5]]
    with pytest.raises(ValueError, match="batch_size"):
        plain_batches(examples, 0, pad_token_id=0)


# --- SmolLM2's real chat template ------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2):
    return smollm2[1]


@pytest.mark.integration
def test_smollm2_chat_mask_is_exactly_the_assistant_turns(smol_tokenizer):
    record = _chat(("user", "hi"), ("assistant", "Hello there!"), ("user", "And now?"),
                   ("assistant", "Still here."))
    _, example = encode_record(record, smol_tokenizer)
    text = smol_tokenizer.decode(example.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant")  # the default
    assert smol_tokenizer.decode(_supervised(example)) == (
        "Hello there!<|im_end|>Still here.<|im_end|>")


@pytest.mark.integration
def test_smollm2_prompt_completion_matches_render_prompt(smol_tokenizer):
    _, example = encode_record({"prompt": "2+2=", "completion": "4"}, smol_tokenizer)
    prompt_ids = render_prompt(smol_tokenizer, "2+2=")
    assert smol_tokenizer.decode(prompt_ids).endswith(
        "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n")
    assert example.input_ids[:len(prompt_ids)] == prompt_ids
    assert smol_tokenizer.decode(_supervised(example)) == "4<|im_end|>"
    # SmolLM2's BOS token is <|im_start|>, which the template writes itself: none is added.
    assert example.input_ids.count(smol_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


@pytest.mark.integration
def test_smollm2_text_supervises_all_with_eos(smol_tokenizer):
    _, example = encode_record({"text": "The quick brown fox."}, smol_tokenizer)
    assert example.labels == example.input_ids
    assert smol_tokenizer.decode(example.input_ids) == "The quick brown fox." + (
        smol_tokenizer.eos_token)

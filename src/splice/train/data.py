"""Training data: JSONL lines tokenized into (input_ids, labels) with a loss mask.

Three shapes, detected per line:

    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    {"prompt": "2+2=", "completion": "4"}
    {"text": "any document"}

Labels follow the transformers convention: `labels[t] = input_ids[t]` where the token is learned
and -100 where it is not; the model shifts them by one inside its loss, so `labels[0]` is never
used and "supervised tokens" below counts `labels[1:]`.

- chat: loss on every assistant turn's content and the token that closes it (see Note: Chat
  masks by prefixes). Role headers, system prompts (default ones too) and user turns are context.
- prompt/completion: loss on the completion and the EOS after it. With a chat template the pair
  is the chat [user: prompt, assistant: completion], so the prompt is the user turn plus the
  generation prompt and the assistant's end-of-turn token plays EOS; without one, the tokens are
  `BOS? + prompt + completion + EOS`. `render_prompt` returns exactly the prompt tokens used here,
  for generation and evaluation.
- text: loss on every token (+ EOS).

Truncation keeps the first `max_len` tokens (the simplest rule, and the one that never moves a
prompt); an example left with nothing to learn is dropped. Both are counted in `DataStats`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from splice.core.errors import SpliceError

IGNORE_INDEX = -100
"""Label of a position that contributes no loss (the value torch's cross_entropy ignores)."""

SHAPES = ("chat", "prompt_completion", "text")

_HASH_CHUNK_BYTES = 1 << 20  # 1 MiB


class DataError(SpliceError, ValueError):
    """A training-data file or line that cannot be used; the message names file, line and fix."""


@dataclass(frozen=True)
class Example:
    """One tokenized sequence: `labels` is `input_ids` with -100 where no loss is taken."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_supervised(self) -> int:
        """Positions that contribute to the loss (labels[1:], as the model shifts by one)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class DataStats:
    """What loading a file did, for the CLI's summary and warnings."""

    lines_read: int = 0
    """Non-blank lines."""
    skipped: int = 0
    """Malformed lines skipped under skip_bad."""
    truncated: int = 0
    """Examples cut to max_len (kept if anything supervised is left)."""
    dropped_unsupervised: int = 0
    """Examples with no supervised token left after truncation."""
    shapes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SHAPES, 0))
    """Kept examples per shape."""
    total_tokens: int = 0
    supervised_tokens: int = 0


@dataclass
class TokenizedDataset:
    """The examples of one file, in file order, and how loading went."""

    examples: list[Example]
    stats: DataStats

    def __len__(self) -> int:
        return len(self.examples)


# --- public entry points ---------------------------------------------------------------------


def load_jsonl(path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, *,
               max_len: int, skip_bad: bool = False) -> TokenizedDataset:
    """Tokenize every line of a JSONL file into masked examples of at most `max_len` tokens.

    A malformed line raises `DataError` naming `path:line` and the problem, or, with `skip_bad`,
    is skipped and counted. Blank lines are ignored. A file that yields no example is an error:
    training on nothing is never what was meant.
    """
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len={max_len!r}: give at least 2 tokens (one input, one target)")
    path = Path(path)
    stats, examples = DataStats(), []
    for lineno, line in _read_lines(path):
        stats.lines_read += 1
        try:
            shape, example = encode_record(_parse_line(line), tokenizer)
        except DataError as error:
            if not skip_bad:
                raise DataError(f"{path}:{lineno}: {error}") from error
            stats.skipped += 1
            continue
        _keep(example, shape, max_len, stats, examples)
    if not examples:
        raise DataError(f"{path}: no usable examples ({_summary(stats)}); "
                        "check the file holds messages, prompt/completion or text lines")
    return TokenizedDataset(examples, stats)


def encode_record(record: Any, tokenizer: PreTrainedTokenizerBase) -> tuple[str, Example]:
    """The shape name and untruncated example of one parsed JSONL record.

    Raises `DataError` (without a location; `load_jsonl` adds it) for a record of no known shape.
    """
    shape = detect_shape(record)
    if shape == "chat":
        return shape, _encode_chat(_check_messages(record["messages"]), tokenizer)
    if shape == "prompt_completion":
        prompt = _check_text(record, "prompt", allow_empty=True)
        completion = _check_text(record, "completion")
        return shape, _encode_prompt_completion(prompt, completion, tokenizer)
    return shape, _encode_text(_check_text(record, "text"), tokenizer)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt tokens exactly as prompt/completion training sees them (see module docstring).

    With a chat template: one user turn plus the generation prompt; without: BOS (when the
    tokenizer adds one) and the prompt. Generation continues from the last of these tokens.
    """
    if tokenizer.chat_template:
        return _render_chat(tokenizer, [_user(prompt)], generation_prompt=True)
    return _bos_prefix(tokenizer) + _tokenize(tokenizer, prompt)


def data_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of the file's bytes, hex: training.json records which data an adapter saw."""
    digest = hashlib.sha256()
    with open(_existing(Path(path)), "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def detect_shape(record: Any) -> str:
    """'chat', 'prompt_completion' or 'text'; other keys (ids, metadata) are allowed and ignored."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if not record:
        raise DataError("empty object; give messages, prompt/completion or text")
    found = [key for key in ("messages", "prompt", "completion", "text") if key in record]
    if found == ["messages"]:
        return "chat"
    if found == ["prompt", "completion"]:
        return "prompt_completion"
    if found == ["text"]:
        return "text"
    if not found:
        raise DataError(f"none of the known keys (keys: {', '.join(sorted(record))}); give "
                        "'messages', 'prompt' and 'completion', or 'text'")
    if found in (["prompt"], ["completion"]):
        missing = "completion" if found == ["prompt"] else "prompt"
        raise DataError(f"has {found[0]!r} but no {missing!r}; a pair needs both")
    raise DataError(f"mixes shapes ({', '.join(found)}); use one shape per line")


# --- reading and validating -----------------------------------------------------------------


def _existing(path: Path) -> Path:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"training data {path} {what}; pass a JSONL file")
    return path


def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line."""
    with open(_existing(path), encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                yield lineno, line


def _parse_line(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON ({error.msg} at column {error.colno})") from None


def _check_text(record: Mapping[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{key!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{key!r} is empty; nothing to learn from this line")
    return value


def _check_messages(messages: Any) -> list[dict[str, str]]:
    """Each message an object with string role and content; at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"messages[{index}] must be an object, got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(f"messages[{index}].{key} must be a string, "
                                f"got {type(message.get(key)).__name__}")
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError("no 'assistant' message; a chat trains only on assistant turns")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# --- tokenizing ----------------------------------------------------------------------------


def _tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of `text` with no special tokens added (rendered templates already carry theirs)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@functools.lru_cache(maxsize=8)
def _bos_prefix_cached(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Cached per tokenizer: finding it costs two tokenizer calls, per line of a large file."""
    return tuple(_find_bos_prefix(tokenizer))


def _tokenize_many(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, list[int]]:
    """Ids of each distinct text, in one batched call (a chat's last turn ends the full text,
    so that rendering is shared)."""
    distinct = list(dict.fromkeys(texts))
    return dict(zip(distinct, tokenizer(distinct, add_special_tokens=False)["input_ids"]))


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return list(_bos_prefix_cached(tokenizer))


def _find_bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids a tokenizer puts before plain text by itself (Llama: [BOS]; GPT-2, SmolLM2: []).

    Found by tokenizing with and without special tokens rather than trusting `add_bos_token`,
    which not every tokenizer class defines.
    """
    plain = _tokenize(tokenizer, "a")
    full = list(tokenizer("a")["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _eos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; set one so the model learns to stop")
    return [tokenizer.eos_token_id]


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], *,
                 generation_prompt: bool) -> list[int]:
    """Token ids of `messages` rendered by the chat template."""
    return _tokenize(tokenizer, _chat_text(tokenizer, messages, generation_prompt))


def _chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]],
               generation_prompt: bool) -> str:
    """The template's text (tokenized by the caller: with tokenize=True transformers 5 may hand
    back a BatchEncoding, and the text already holds the template's special tokens)."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as error:  # jinja raises its own types (unknown role, template errors)
        raise DataError(f"the chat template failed on these messages: {error}") from error


def _encode_text(text: str, tokenizer: PreTrainedTokenizerBase) -> Example:
    ids = _bos_prefix(tokenizer) + _tokenize(tokenizer, text) + _eos(tokenizer)
    return Example(ids, list(ids))


def _encode_prompt_completion(prompt: str, completion: str,
                              tokenizer: PreTrainedTokenizerBase) -> Example:
    if tokenizer.chat_template:
        return _encode_chat([_user(prompt), {"role": "assistant", "content": completion}],
                            tokenizer)
    prompt_ids = render_prompt(tokenizer, prompt)
    completion_ids = _continuation(tokenizer, prompt, completion, prompt_ids)
    target = completion_ids + _eos(tokenizer)
    return Example(prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target)


def _continuation(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str,
                  prompt_ids: list[int]) -> list[int]:
    """The completion's ids as they follow the prompt.

    Tokenizing the joined text keeps the tokens a model would see in running text (sentencepiece
    tokenizers add a space at the start of every separate call); when the joint tokens do not
    begin with the prompt's (a merge across the boundary), the completion is tokenized alone so
    the prompt stays exactly `render_prompt`'s.
    """
    joint = _bos_prefix(tokenizer) + _tokenize(tokenizer, prompt + completion)
    if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return joint[len(prompt_ids):]
    return _tokenize(tokenizer, completion)


# Note: Chat masks by prefixes
# An assistant turn's tokens are found by rendering, not by searching for strings: the template
# applied to messages[:i] with the generation prompt gives the context before turn i, and applied
# to messages[:i+1] gives the context after it; the turn is the token range between the two
# lengths, checked to be prefixes of the whole rendering. Anything the template adds (a default
# system prompt, role headers) lies outside those ranges. The range is cut after its last special
# token, the end-of-turn (<|im_end|>): what follows it (SmolLM2's "\n") separates turns and is
# never generated, as generation stops at the end-of-turn.


def _encode_chat(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> Example:
    """Render the whole chat; supervise each assistant turn (see Note: Chat masks by prefixes)."""
    if not tokenizer.chat_template:
        raise DataError("'messages' lines need a tokenizer with a chat template; this one has "
                        "none. Use prompt/completion or text lines instead")
    turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if turns[0] == 0:
        raise DataError("the chat opens with an assistant turn, which a template renders only "
                        "after another message; put a user (or system) message first")
    full = _chat_text(tokenizer, messages, False)
    bounds = [(_chat_text(tokenizer, messages[:index], True),
               _chat_text(tokenizer, messages[:index + 1], False)) for index in turns]
    encoded = _tokenize_many(tokenizer, [full] + [text for pair in bounds for text in pair])
    ids = encoded[full]
    labels = [IGNORE_INDEX] * len(ids)
    special = set(tokenizer.all_special_ids)
    for index, (before, after) in zip(turns, bounds):
        start, end = _turn_range(ids, encoded[before], encoded[after], index)
        end = _cut_after_end_of_turn(ids, start, end, special)
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _turn_range(ids: list[int], before: list[int], after: list[int],
                index: int) -> tuple[int, int]:
    """[start, end) of assistant turn `index` in the full rendering `ids`, given the renderings
    of the messages before it (with the generation prompt) and up to it."""
    if ids[:len(before)] != before or ids[:len(after)] != after or len(after) < len(before):
        raise DataError(
            f"the chat template does not render messages[{index}] (assistant) as an extension of "
            "the messages before it, so its tokens cannot be located; a template that rewrites "
            "earlier turns (e.g. drops their reasoning) does this")
    return len(before), len(after)


def _cut_after_end_of_turn(ids: list[int], start: int, end: int, special: set[int]) -> int:
    """End of the supervised range: just after the turn's last special token, if it has one."""
    for position in range(end - 1, start - 1, -1):
        if ids[position] in special:
            return position + 1
    return end


# --- truncating and counting ----------------------------------------------------------------


def _keep(example: Example, shape: str, max_len: int, stats: DataStats,
          examples: list[Example]) -> None:
    """Truncate `example` to its first max_len tokens and keep it if it still teaches anything."""
    if len(example) > max_len:
        stats.truncated += 1
        example = Example(example.input_ids[:max_len], example.labels[:max_len])
    supervised = example.num_supervised
    if supervised == 0:
        stats.dropped_unsupervised += 1
        return
    stats.shapes[shape] += 1
    stats.total_tokens += len(example)
    stats.supervised_tokens += supervised
    examples.append(example)


def _summary(stats: DataStats) -> str:
    return (f"{stats.lines_read} lines, {stats.skipped} skipped, "
            f"{stats.dropped_unsupervised} with no supervised tokens")


def read_prompt_completions(path: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """The prompts and reference completions of the prompt/completion lines of a file (for
    exact-match evaluation); lines of other shapes are left out."""
    prompts, completions = [], []
    for _, line in _read_lines(_existing(Path(path))):
        record = _parse_line(line)
        if detect_shape(record) == "prompt_completion":
            prompts.append(record["prompt"])
            completions.append(record["completion"])
    return prompts, completions

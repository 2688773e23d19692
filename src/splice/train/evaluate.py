"""Evaluation: held-out loss, and for prompt/completion tasks batched greedy generation and
exact match; `evaluate_file` runs both on a JSONL file (what `splice eval` prints).

Prompts are rendered by `splice.train.data.render_prompt`, the rendering prompt/completion training
uses (one user turn of the chat template plus the generation prompt; BOS and plain text without a
template), so a model is scored on exactly the context it was trained on.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from splice.core.errors import SpliceError
from splice.train.data import load_jsonl, read_prompt_completions, render_prompt
from splice.train.loop import evaluate_loss

LOSS_CHUNK_TOKENS = 256
"""Tokens per chunk of the output-head loss (bounds logits memory; the training default)."""

COMPLETION_MARGIN_TOKENS = 8
"""New tokens allowed beyond the longest reference, so a prediction that runs on is seen whole."""


@dataclass
class EvalReport:
    """What `evaluate_file` measured on one file."""

    examples: int
    """Examples the loss was taken over (every usable line, any shape)."""
    eval_loss: float
    """Token-mean cross-entropy over the supervised tokens, in nats."""
    exact_match: float | None
    """Fraction of greedy completions equal to the reference; None without prompt/completion lines."""
    prompts: list[str] = field(default_factory=list)
    predictions: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    """The pairs exact match was scored on, in file order (for showing a few)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.eval_loss) if self.eval_loss < 700 else math.inf  # exp(710) overflows


def evaluate_file(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None,
                  path: str | os.PathLike[str], *, batch_size: int = 8, max_len: int = 512,
                  exact_match_limit: int | None = None) -> EvalReport:
    """Eval loss over every line of a JSONL file (tokenized and masked as training does, cut to
    `max_len`), and greedy exact match over its first `exact_match_limit` (default all)
    prompt/completion lines. A malformed line raises `DataError` naming `path:line`."""
    if tokenizer is None:
        raise SpliceError("the model folder has no tokenizer; evaluation needs one to read the data")
    if exact_match_limit is not None and exact_match_limit < 1:
        raise ValueError(f"exact_match_limit must be >= 1 (or None for all), got {exact_match_limit}")
    data = load_jsonl(path, tokenizer, max_len=max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = evaluate_loss(model, data.examples, batch_size=batch_size, pad_id=pad_id,
                         chunk_size=LOSS_CHUNK_TOKENS)
    prompts, references = read_prompt_completions(path)
    prompts, references = prompts[:exact_match_limit], references[:exact_match_limit]
    if not prompts:
        return EvalReport(len(data), loss, None)
    predictions = greedy_completions(model, tokenizer, prompts, batch_size=batch_size,
                                     max_new_tokens=completion_budget(tokenizer, references))
    return EvalReport(len(data), loss, exact_match(predictions, references), prompts, predictions,
                      references)


def completion_budget(tokenizer: PreTrainedTokenizerBase, references: Sequence[str]) -> int:
    """New tokens to allow when generating: the longest reference plus a margin."""
    longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
    return longest + COMPLETION_MARGIN_TOKENS


def _stop_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends a completion: the tokenizer's and the generation config's EOS."""
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    if not ids:
        raise ValueError("the tokenizer has no eos_token_id and the model's generation_config "
                         "names none; set tokenizer.eos_token so completions can end")
    return ids


def _left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows to one length: [[5, 6, 7], [8]] -> [[5, 6, 7], [p, p, 8]]."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask


def _cut_at_stop(ids: list[int], stop_ids: set[int]) -> list[int]:
    for position, token in enumerate(ids):
        if token in stop_ids:
            return ids[:position]
    return ids


def greedy_completions(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                       prompts: Sequence[str], *, max_new_tokens: int,
                       batch_size: int = 16, progress: bool = True) -> list[str]:
    """Greedy completions of `prompts`, one string per prompt, in the order given.

    Prompts are rendered with `render_prompt`, sorted by length so that a batch carries little
    padding, left-padded (so every row's next token sits in the last column) and decoded by
    `model.generate` without sampling. Only the new tokens are decoded, cut at the first EOS and
    stripped of surrounding whitespace. The model runs in eval mode under `torch.inference_mode()`;
    its previous train/eval mode is restored afterwards. A tqdm bar over batches goes to stderr
    unless `progress` is False.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    rows = [render_prompt(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), i))
    device = next(model.parameters()).device
    results: list[str] = [""] * len(rows)
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="generating", unit="batch", file=sys.stderr,
                              disable=not progress):
                input_ids, attention_mask = _left_pad([rows[i] for i in batch], pad_id)
                output = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    pad_token_id=pad_id, eos_token_id=sorted(stop_ids))  # (B, T + new)
                new_tokens = output[:, input_ids.shape[1]:].tolist()  # (B, new)
                for index, ids in zip(batch, new_tokens):
                    text = tokenizer.decode(_cut_at_stop(ids, stop_ids), skip_special_tokens=True)
                    results[index] = text.strip()
    finally:
        model.train(was_training)
    return results


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of predictions equal to their reference after stripping leading and trailing
    whitespace from both (`" a=1 \\n"` matches `"a=1"`; inner whitespace and case must match)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; "
                         "pass one prediction per reference")
    if not references:
        raise ValueError("exact_match of zero examples is undefined; pass at least one pair")
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return hits / len(references)

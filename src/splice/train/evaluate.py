"""Evaluation of prompt/completion tasks: batched greedy generation and exact match.

Prompts are rendered by `splice.train.data.render_prompt`, the rendering prompt/completion training
uses (one user turn of the chat template plus the generation prompt; BOS and plain text without a
template), so a model is scored on exactly the context it was trained on.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from splice.train.data import render_prompt


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

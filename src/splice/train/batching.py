"""Batches of right-padded examples, grouped by length so that little compute goes to padding.

`length_bucketed_batches` is the training order: a shuffle fixed by (seed, epoch), then within
mega-chunks of `chunk_batches * batch_size` examples a sort by length, cut into batches whose
order is shuffled again. Batches hold examples of similar length (little padding) while the data
stays mixed across an epoch. The same (seed, epoch) always gives the same batches, which is what
lets a resumed run skip the batches it has already seen. `plain_batches` keeps file order, for
evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splice.train.data import IGNORE_INDEX, Example

DEFAULT_CHUNK_BATCHES = 50
"""Batches per sorted mega-chunk: larger packs tighter, smaller keeps the order more random."""


@dataclass(frozen=True)
class Batch:
    """Right-padded tensors of one micro-batch; labels are -100 on padding."""

    input_ids: torch.Tensor  # (B, T) long, pad_token_id on padding
    attention_mask: torch.Tensor  # (B, T) long, 1 on real tokens
    labels: torch.Tensor  # (B, T) long, -100 where no loss
    num_tokens: int
    """Real (non-padding) tokens."""
    num_supervised: int
    """Targets that contribute to the loss: labels[:, 1:] != -100, as the model shifts by one."""

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.labels.to(device), self.num_tokens, self.num_supervised)


def collate(examples: Sequence[Example], pad_token_id: int) -> Batch:
    """Right-pad examples to the longest: [[5, 6, 7], [8]] -> [[5, 6, 7], [8, p, p]]."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, example in enumerate(examples):
        length = len(example)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
    return Batch(input_ids, attention_mask, labels,
                 num_tokens=int(attention_mask.sum()),
                 num_supervised=int((labels[:, 1:] != IGNORE_INDEX).sum()))


def length_bucketed_batches(examples: Sequence[Example], batch_size: int, *, seed: int,
                            epoch: int, pad_token_id: int,
                            chunk_batches: int = DEFAULT_CHUNK_BATCHES) -> list[Batch]:
    """One epoch's batches: each example exactly once, similar lengths together.

    The last batch may be smaller than `batch_size` (no example is dropped). Deterministic in
    (seed, epoch): a run resumed at batch k of an epoch sees the same batches from k on.
    """
    _check_size(batch_size)
    if chunk_batches < 1:
        raise ValueError(f"chunk_batches must be >= 1, got {chunk_batches}")
    rng = random.Random(f"splice-batches:{seed}:{epoch}")  # str seeds hash stably across runs
    order = list(range(len(examples)))
    rng.shuffle(order)
    groups: list[list[int]] = []
    chunk = chunk_batches * batch_size
    for begin in range(0, len(order), chunk):
        by_length = sorted(order[begin:begin + chunk], key=lambda i: len(examples[i]))
        groups.extend(by_length[at:at + batch_size] for at in range(0, len(by_length), batch_size))
    rng.shuffle(groups)
    return [collate([examples[i] for i in group], pad_token_id) for group in groups]


def plain_batches(examples: Sequence[Example], batch_size: int, *,
                  pad_token_id: int) -> list[Batch]:
    """Batches in the given order, the last possibly smaller (evaluation: every example once)."""
    _check_size(batch_size)
    return [collate(examples[begin:begin + batch_size], pad_token_id)
            for begin in range(0, len(examples), batch_size)]


def padding_waste(batches: Sequence[Batch]) -> float:
    """Fraction of all batch positions that are padding (0.0: none; compute spent on nothing)."""
    positions = sum(batch.input_ids.numel() for batch in batches)
    if positions == 0:
        return 0.0
    return 1.0 - sum(batch.num_tokens for batch in batches) / positions


def _check_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

"""EVA, explained variance adaptation (Paischer et al. 2024): A starts on the principal directions
of the layer's inputs, and the rank budget goes where the inputs vary most.

From a few batches of training data, each target layer's inputs x (d_in,) give the covariance
C = E[x xᵀ] - μμᵀ, gathered as running sums (Σ x xᵀ, Σ x, n over non-padding tokens, in fp64), so
memory does not grow with the number of batches. With C = V Λ Vᵀ (Λ descending):

    A = V[:, :r]ᵀ  (r, in, orthonormal rows),   B = 0,   the base is unchanged

Ranks: the budget Σ r over the target layers is shared out by explained variance λᵢ / Σλ: each
layer keeps its first component, the rest of the budget goes to the largest ratios over all
layers, with at most ρ·r (and d_in) per layer. ρ = 1 keeps every layer at its rank. The result
is a `rank_pattern`, so the adapter file records each layer's rank.

Layers that read the same tensor (q/k/v, gate/up) share one set of sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from splice.config.lora import InitOptions, LoRAConfig
from splice.inits.registry import InitSpec, LowRankInit, register_init


@dataclass
class InputMoments:
    """Running Σ x xᵀ, Σ x and the row count of one layer input, and its eigendecomposition."""

    gram: torch.Tensor | None = None   # (d, d) fp64
    total: torch.Tensor | None = None  # (d,) fp64
    count: int = 0
    #: filled by `finish`: eigenvalues (d,) descending and eigenvectors as rows (d, d)
    variance: torch.Tensor | None = field(default=None, repr=False)
    components: torch.Tensor | None = field(default=None, repr=False)

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().to(torch.float64)                       # (n, d)
        if self.gram is None:
            self.gram = rows.new_zeros(rows.shape[1], rows.shape[1])
            self.total = rows.new_zeros(rows.shape[1])
        self.gram.addmm_(rows.T, rows)
        self.total += rows.sum(0)
        self.count += rows.shape[0]

    def covariance(self) -> torch.Tensor:
        mean = self.total / self.count                               # (d,)
        return self.gram / self.count - torch.outer(mean, mean)      # (d, d)

    def finish(self) -> None:
        if self.components is None:
            values, vectors = torch.linalg.eigh(self.covariance())   # ascending
            self.variance = values.flip(0).clamp_min(0).float()
            self.components = vectors.flip(1).T.contiguous().float()

    def explained(self) -> torch.Tensor:
        """λᵢ / Σλ, descending."""
        return self.variance / self.variance.sum().clamp_min(1e-30)


def batch_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The (n, d) rows of a (B, T, d) input at the mask's real tokens (all rows without one)."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_input_moments(model: nn.Module, targets: Mapping[str, nn.Module],
                          batches: Iterable[Mapping[str, torch.Tensor]],
                          config: LoRAConfig) -> dict[str, InputMoments]:
    """Run the batches through `model` (no labels needed) and gather each target's input sums."""
    moments: dict[str, InputMoments] = {}
    current: dict[str, Any] = {}

    def hook_for(path: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            seen = current["inputs"]
            mine = moments.get(path)
            if mine is None:  # first batch: layers fed the same tensor share one InputMoments
                # The tensor is kept (in `seen`) until the batch ends, so its id is not reused.
                mine = seen.get(id(x), (x, InputMoments()))[1]
                moments[path] = mine
            if id(mine) not in current["updated"]:
                current["updated"].add(id(mine))
                seen.setdefault(id(x), (x, mine))
                mine.add(batch_rows(x, current["mask"]))
        return hook

    handles = [module.register_forward_pre_hook(hook_for(path)) for path, module in targets.items()]
    try:
        for batch in batches:
            current.update(inputs={}, updated=set(), mask=batch.get("attention_mask"))
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    finally:
        for handle in handles:
            handle.remove()
        current.clear()
    missing = sorted(set(targets) - set(moments))
    if missing:
        raise ValueError(f"eva: {missing[0]} saw no input; the batches do not reach it")
    for value in moments.values():
        value.finish()
    return moments


def plan_eva_ranks(config: LoRAConfig, moments: Mapping[str, InputMoments]) -> dict[str, int]:
    """Each layer's rank after sharing the budget Σ rank out by explained variance."""
    paths = list(moments)
    caps = {p: min(math.floor(config.init_options.eva_rho * config.rank_for(p)),
                   moments[p].variance.numel()) for p in paths}
    budget = sum(config.rank_for(p) for p in paths)
    ranks = {p: 1 for p in paths}
    candidates = [(float(ratio), p) for p in paths
                  for ratio in moments[p].explained()[1:caps[p]].tolist()]
    candidates.sort(key=lambda c: -c[0])  # stable: ties keep layer order
    for _, p in candidates[:max(budget - len(paths), 0)]:
        ranks[p] += 1
    return ranks


def eva_init(weight: torch.Tensor, rank: int, scaling: float, options: InitOptions,
             moments: InputMoments) -> LowRankInit:
    a = moments.components[:rank].to(weight.dtype)                  # (r, in)
    return LowRankInit(a=a.contiguous(), b=weight.new_zeros(weight.shape[0], rank))


register_init(InitSpec("eva", eva_init, "A on the principal directions of the layer inputs, B = 0, "
                       "ranks redistributed by explained variance",
                       collect=collect_input_moments, plan_ranks=plan_eva_ranks))

"""The Rank panel: what a LoRA adapter of rank r trains on the loaded model, counted for real.

Counting runs on a parameter-free copy of the model's architecture on the meta device (see
`skeleton_of`), so it costs no memory, never waits for the other panels, and its "full model"
figure is the base model's even while the resident model carries adapters.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from splice.config.base import ConfigError
from splice.config.lora import LoRAConfig
from splice.core.report import ParameterReport, parameter_report
from splice.core.targets import iter_targets

BYTES_PER_PARAM = 4
"""Adapter size on disk per parameter: fp32, as `splice params` reports it."""
EXAMPLE_SHAPE = (4096, 4096)
"""The per-matrix example: one 4096×4096 weight (a 7B model's attention projection)."""
MAX_RANK = 256


def skeleton_of(model: nn.Module) -> nn.Module:
    """The model's architecture with every tensor on the meta device (no memory, no values).

    Built from the config for a transformers model, otherwise by copying the modules; either way
    before any adapter is attached, so it is the base model."""
    if isinstance(model, PreTrainedModel):
        with torch.device("meta"):
            return type(model)._from_config(copy.deepcopy(model.config))
    return copy.deepcopy(model).to("meta")


def target_choices(model: nn.Module) -> list[str]:
    """The last names of the linear layers 'all-linear' adapts (q_proj, v_proj, ...), in model
    order: the targets the panel offers."""
    names: list[str] = []
    for path, _ in iter_targets(model, LoRAConfig(target_modules="all-linear")):
        leaf = path.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    return names


@dataclass(frozen=True)
class RankResult:
    rank: int
    targets: list[str] | str
    adapter_params: int
    model_params: int
    percent: float
    adapter_bytes: int
    rows: list[dict]
    example: dict


class RankPanel:
    """Counts for the Rank panel, from `parameter_report` on the model's skeleton."""

    def __init__(self, model: nn.Module) -> None:
        self.skeleton = skeleton_of(model)
        self.choices = target_choices(self.skeleton)

    def report(self, rank: int, targets: list[str] | str) -> RankResult:
        config = lora_config(rank, targets, self.choices)
        report = parameter_report(self.skeleton, config)
        return RankResult(rank, list(config.target_modules) if isinstance(config.target_modules, tuple)
                          else config.target_modules, report.adapter_params, report.model_params,
                          report.percent, report.adapter_params * BYTES_PER_PARAM,
                          [asdict(row) for row in report.rows], matrix_example(rank))


def lora_config(rank: int, targets: list[str] | str, choices: list[str]) -> LoRAConfig:
    if not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise ConfigError(f"rank={rank!r}: the panel's slider goes from 1 to {MAX_RANK}")
    if targets != "all-linear":
        unknown = [t for t in targets if t not in choices]
        if unknown or not targets:
            raise ConfigError(f"targets={targets!r}: choose 'all-linear' or some of "
                              f"{', '.join(choices)}")
        targets = tuple(targets)
    return LoRAConfig(rank=rank, target_modules=targets)


def matrix_report(out_features: int, in_features: int, rank: int) -> ParameterReport:
    """`parameter_report` for a single out×in weight matrix, on the meta device."""
    matrix = nn.Sequential(nn.Linear(in_features, out_features, bias=False, device="meta"))
    return parameter_report(matrix, LoRAConfig(rank=rank, target_modules="all-linear"))


def matrix_example(rank: int) -> dict:
    out_features, in_features = EXAMPLE_SHAPE
    lora = matrix_report(out_features, in_features, rank).adapter_params
    full = out_features * in_features
    return {"out_features": out_features, "in_features": in_features, "rank": rank,
            "lora_params": lora, "full_params": full, "ratio": full / lora}

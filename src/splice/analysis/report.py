"""Diagnostics of a trained adapter on its model: per adapted matrix and in summary.

For every matrix an adapter changes: ‖ΔW‖_F and ‖ΔW‖_F/‖W₀‖_F, the singular values of ΔW with
their effective ranks (analysis/spectrum.py), and the intruder dimensions of W₀ + ΔW
(analysis/intruders.py). `compare_adapters` gives the cosine between two adapters' updates per
matrix (analysis/similarity.py).

Matrices are taken as linear maps, (out, in): nn.Linear's weight as it is, GPT-2's Conv1D weight
and an embedding table transposed, so singular vectors on the left live in the output space for
every layer type. ΔW comes from the layer's adapter protocol (`delta_weight`, or what `fold_into`
adds for a method that only folds), so any mergeable method works; an adapter of a method in
LOW_RANK_METHODS has ΔW = s·B·A exactly, and its spectrum and inner products come from the
factors. Other methods' updates (DoRA's rescaled rows, IA³'s scaled columns) are analysed dense.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from splice.analysis.config import (DEFAULT_EPSILON, DEFAULT_EPSILONS, DEFAULT_TOP_K,
                                    AnalysisConfig)
from splice.analysis.intruders import BaseSVDCache, IntruderCounts, intruder_dimensions
from splice.analysis.similarity import Update, cosine, inner_product
from splice.analysis.spectrum import Spectrum, dense_singular_values, factor_singular_values
from splice.core.attach import delete_adapter
from splice.core.errors import AdapterError
from splice.core.io import load_adapter
from splice.core.layer import AdapterLayer, adapter_layers
from splice.core.registry import get_method
from splice.core.state import require_adapter
from splice.core.targets import Conv1D
from splice.merge.compose_model import lora_factors
from splice.models import load_model
from splice.quant.surgery import quantized_layers

#: methods whose update is exactly s·B·A of the factors `lora_factors` finds (DoRA's file holds
#: the same factors, but its update also rescales W₀'s rows)
LOW_RANK_METHODS = frozenset({"lora"})


@dataclass(frozen=True)
class MatrixAnalysis:
    """One adapted matrix."""

    path: str                  # the module's path in the model
    kind: str                  # its last name (q_proj, c_attn, …)
    layer: int | None          # the first number in its path (the block index), if any
    shape: tuple[int, int]     # (out, in)
    rank_budget: int | None    # the adapter's rank r on this matrix (None: not low-rank)
    delta_norm: float          # ‖ΔW‖_F
    base_norm: float           # ‖W₀‖_F
    spectrum: Spectrum         # singular values of ΔW and effective ranks
    intruders: IntruderCounts  # of W₀ + ΔW against W₀

    @property
    def relative_norm(self) -> float:
        return self.delta_norm / self.base_norm if self.base_norm > 0 else float("inf")

    @property
    def budget_use(self) -> float | None:
        """Entropy effective rank / rank budget: the share of the rank the update spreads over."""
        return None if not self.rank_budget else self.spectrum.entropy_rank / self.rank_budget


@dataclass(frozen=True)
class AdapterSummary:
    """One adapter over all its matrices. A stable record for sweeps: `intruder_dimensions` is
    the paper's model-level count (summed over matrices, top `top_k`, threshold `epsilon`)."""

    adapter: str
    method: str
    matrices: int
    top_k: int
    epsilon: float
    intruder_dimensions: int            # Σ over matrices of the intruders at `epsilon`
    intruder_counts: dict[float, int]   # the same sum for every ε of the sweep
    matrices_with_intruders: int        # matrices with at least one intruder at `epsilon`
    delta_norm: float                   # √Σ‖ΔW‖²
    relative_norm: float                # √Σ‖ΔW‖² / √Σ‖W₀‖²
    mean_relative_norm: float           # mean over matrices of ‖ΔW‖/‖W₀‖
    mean_entropy_rank: float            # mean over matrices
    mean_budget_use: float | None       # mean of entropy rank / r over low-rank matrices


@dataclass(frozen=True)
class AdapterAnalysis:
    matrices: tuple[MatrixAnalysis, ...]
    summary: AdapterSummary
    config: AnalysisConfig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the summary, the settings and one entry per matrix (ε keys as strings)."""
        def row(m: MatrixAnalysis) -> dict[str, Any]:
            return {"path": m.path, "kind": m.kind, "layer": m.layer, "shape": list(m.shape),
                    "rank_budget": m.rank_budget, "delta_norm": m.delta_norm,
                    "base_norm": m.base_norm, "relative_norm": m.relative_norm,
                    "singular_values": list(m.spectrum.values),
                    "entropy_rank": m.spectrum.entropy_rank,
                    "energy_ranks": _str_keys(m.spectrum.energy_ranks),
                    "budget_use": m.budget_use,
                    "intruder_max_cosines": list(m.intruders.max_cosines),
                    "intruder_counts": _str_keys(m.intruders.counts)}
        summary = asdict(self.summary)
        summary["intruder_counts"] = _str_keys(self.summary.intruder_counts)
        return {"summary": summary, "config": {**asdict(self.config),
                                               "epsilons": list(self.config.epsilons)},
                "matrices": [row(m) for m in self.matrices]}


def analyze_adapter(model: nn.Module, adapter_name: str = "default", top_k: int = DEFAULT_TOP_K,
                    epsilons: Sequence[float] = DEFAULT_EPSILONS, *,
                    epsilon: float = DEFAULT_EPSILON,
                    cache: BaseSVDCache | None = None) -> AdapterAnalysis:
    """Diagnose adapter `adapter_name` on `model` (see the module docstring and AnalysisConfig
    for top_k, epsilons and epsilon). `.summary.intruder_dimensions` is the model-level count.

    Pass one `cache` to several calls on the same model to compute each W₀'s SVD once."""
    config = AnalysisConfig(top_k, tuple(epsilons), epsilon)
    cache = cache if cache is not None else BaseSVDCache()
    method = check_analyzable(model, adapter_name)
    with torch.no_grad():
        rows = tuple(analyze_matrix(path, layer, adapter_name, method, config, cache)
                     for path, layer in layers_holding(model, adapter_name))
    return AdapterAnalysis(rows, summarize(adapter_name, method, rows, config), config)


def analyze_matrix(path: str, layer: AdapterLayer, name: str, method: str,
                   config: AnalysisConfig, cache: BaseSVDCache) -> MatrixAnalysis:
    w0 = layer.base_weight().detach()                                  # the base's layout
    transpose = stored_transposed(layer.base_layer)
    base = w0.T.float() if transpose else w0.float()                   # (out, in)
    delta = as_linear_map(layer, weight_update(layer, name, w0))       # (out, in)
    factors = lora_factors(layer, name)
    update = factors[2] if factors is not None else None
    if update is not None and method in LOW_RANK_METHODS:
        values = factor_singular_values(update.a, update.b, update.scaling)
    else:
        values = dense_singular_values(delta)
    intruders = intruder_dimensions(base, base + delta, config.top_k, config.epsilons,
                                    base_vectors=cache.left_vectors(w0, transpose))
    return MatrixAnalysis(path, path.rsplit(".", 1)[-1], layer_index(path),
                          (base.shape[0], base.shape[1]),
                          update.rank if update is not None else None,
                          float(delta.double().norm()), float(base.double().norm()),
                          Spectrum.of(values), intruders)


def summarize(name: str, method: str, rows: tuple[MatrixAnalysis, ...],
              config: AnalysisConfig) -> AdapterSummary:
    n = len(rows)
    delta_sq = sum(m.delta_norm ** 2 for m in rows)
    base_sq = sum(m.base_norm ** 2 for m in rows)
    uses = [m.budget_use for m in rows if m.budget_use is not None]
    per_matrix = [m.intruders.count(config.epsilon) for m in rows]
    return AdapterSummary(
        adapter=name, method=method, matrices=n, top_k=config.top_k, epsilon=config.epsilon,
        intruder_dimensions=sum(per_matrix),
        intruder_counts={e: sum(m.intruders.counts[e] for m in rows) for e in config.epsilons},
        matrices_with_intruders=sum(c > 0 for c in per_matrix),
        delta_norm=delta_sq ** 0.5,
        relative_norm=(delta_sq / base_sq) ** 0.5 if base_sq > 0 else 0.0,
        mean_relative_norm=sum(m.relative_norm for m in rows) / n if n else 0.0,
        mean_entropy_rank=sum(m.spectrum.entropy_rank for m in rows) / n if n else 0.0,
        mean_budget_use=sum(uses) / len(uses) if uses else None)


# -- comparing two adapters --------------------------------------------------------------------

@dataclass(frozen=True)
class MatrixComparison:
    path: str
    cosine: float | None     # None where only one of the adapters changes the matrix
    norm_a: float            # ‖ΔW_a‖_F (0 where a does not adapt it)
    norm_b: float


@dataclass(frozen=True)
class AdapterComparison:
    a: str
    b: str
    matrices: tuple[MatrixComparison, ...]
    cosine: float            # of the two whole updates, every matrix flattened into one vector
    mean_cosine: float       # mean over the matrices both adapt (0 if none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_adapters(model: nn.Module, a: str, b: str) -> AdapterComparison:
    """The cosine of adapters `a` and `b`'s updates per matrix and over the whole model: 1 the
    same update (up to a positive scale), −1 opposite, ≈ 0 unrelated. Low-rank updates are
    compared through their factors, without forming ΔW."""
    updates_a, updates_b = adapter_updates(model, a), adapter_updates(model, b)
    return compare_updates(a, b, updates_a, updates_b, module_order(model))


def adapter_updates(model: nn.Module, name: str) -> dict[str, Update]:
    """Adapter `name`'s update of every matrix it changes, by module path."""
    method = check_analyzable(model, name)
    with torch.no_grad():
        return {path: matrix_update(layer, name, method)
                for path, layer in layers_holding(model, name)}


def compare_updates(a: str, b: str, updates_a: dict[str, Update], updates_b: dict[str, Update],
                    order: dict[str, int]) -> AdapterComparison:
    """Per matrix (in `order`) and overall; a matrix only one adapter changes adds its norm to
    the overall cosine's denominator (the other's update there is zero)."""
    paths = sorted(set(updates_a) | set(updates_b), key=lambda p: order.get(p, len(order)))
    rows, dot = [], 0.0
    for path in paths:
        x, y = updates_a.get(path), updates_b.get(path)
        sq_x = inner_product(x, x) if x is not None else 0.0
        sq_y = inner_product(y, y) if y is not None else 0.0
        both = x is not None and y is not None
        if both:
            dot += inner_product(x, y)
        rows.append(MatrixComparison(path, cosine(x, y) if both else None, sq_x ** 0.5,
                                     sq_y ** 0.5))
    sq_a = sum(r.norm_a ** 2 for r in rows)
    sq_b = sum(r.norm_b ** 2 for r in rows)
    shared = [r.cosine for r in rows if r.cosine is not None]
    total = dot / (sq_a * sq_b) ** 0.5 if sq_a > 0 and sq_b > 0 else 0.0
    return AdapterComparison(a, b, tuple(rows), total,
                             sum(shared) / len(shared) if shared else 0.0)


def matrix_update(layer: AdapterLayer, name: str, method: str) -> Update:
    """Adapter `name`'s update of this layer as a linear map: factors where exact, else dense."""
    factors = lora_factors(layer, name) if method in LOW_RANK_METHODS else None
    if factors is not None:
        update = factors[2]
        return Update(update.a, update.b, update.scaling)
    w0 = layer.base_weight().detach()
    return Update(dense=as_linear_map(layer, weight_update(layer, name, w0)))


# -- the model side ----------------------------------------------------------------------------

def check_analyzable(model: nn.Module, name: str) -> str:
    """The adapter's method, after refusing what has no weight update to analyse."""
    method = require_adapter(model, name).config.method
    spec = get_method(method)
    if not spec.mergeable:
        raise AdapterError(f"adapter {name!r} is a {method} adapter, which changes no weight "
                           f"matrix ({spec.why_not_mergeable or 'not mergeable'}); only adapters "
                           "of mergeable methods (LoRA, DoRA, IA³) can be analysed")
    if quantized_layers(model):
        raise AdapterError("the model has 4-bit (NF4) layers; analyse on a full-precision base: "
                           "splice.quant.dequantize_model(model) first, or load the unquantized "
                           "model")
    merged = [p for p, layer in adapter_layers(model) if layer.merged_adapters]
    if merged:
        raise AdapterError(f"adapters are merged into {merged[0]} (and {len(merged) - 1} more), so "
                           "its weight is no longer W₀; splice.unmerge_adapter(model) first")
    return method


def module_order(model: nn.Module) -> dict[str, int]:
    return {path: i for i, (path, _) in enumerate(model.named_modules())}


def layers_holding(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer]]:
    return [(p, layer) for p, layer in adapter_layers(model) if layer.has_adapter(name)]


def weight_update(layer: AdapterLayer, name: str, w0: torch.Tensor) -> torch.Tensor:
    """ΔW of adapter `name` in the base weight's layout, fp32."""
    try:
        return layer.delta_weight(name).detach().float()
    except NotImplementedError:  # a method that only folds (a scaling): what folding adds
        return layer.fold_into(w0, name, +1).detach().float() - w0.float()


def stored_transposed(base: nn.Module) -> bool:
    """Whether the base keeps its weight as (in, out): GPT-2's Conv1D, and an embedding table
    (num_embeddings, dim), which maps one-hot ids (in) to vectors (out)."""
    return isinstance(base, nn.Embedding) or bool(Conv1D and isinstance(base, Conv1D))


def as_linear_map(layer: AdapterLayer, t: torch.Tensor) -> torch.Tensor:
    """A tensor in the base weight's layout, as (out, in)."""
    return t.T if stored_transposed(layer.base_layer) else t


def layer_index(path: str) -> int | None:
    """The first purely numeric part of a module path: 'model.layers.3.mlp.up_proj' -> 3."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", path)
    return int(match.group(1)) if match else None


def _str_keys(mapping: dict) -> dict[str, Any]:
    return {f"{k:g}" if isinstance(k, float) else str(k): v for k, v in mapping.items()}


# -- from folders (the CLI) ----------------------------------------------------------------------

def analyze_folder(model_name: str | os.PathLike, folder: str | os.PathLike,
                   top_k: int = DEFAULT_TOP_K, epsilons: Sequence[float] = DEFAULT_EPSILONS, *,
                   epsilon: float = DEFAULT_EPSILON) -> AdapterAnalysis:
    """Load the model and the adapter saved in `folder`, and analyse it (as analyze_adapter)."""
    AnalysisConfig(top_k, tuple(epsilons), epsilon)   # refuse bad settings before the load
    model, _ = load_model(model_name)
    load_adapter(model, folder, "default", activate=False)
    return analyze_adapter(model, "default", top_k, epsilons, epsilon=epsilon)


def compare_folders(model_name: str | os.PathLike, folder_a: str | os.PathLike,
                    folder_b: str | os.PathLike) -> AdapterComparison:
    """Load the model and two adapter folders, and compare their updates. The adapters take
    turns on the model, so they may be of methods that cannot share a module (LoRA and DoRA)."""
    model, _ = load_model(model_name)
    updates = []
    for folder in (folder_a, folder_b):
        load_adapter(model, folder, "compared", activate=False)
        updates.append(adapter_updates(model, "compared"))
        delete_adapter(model, "compared")
    return compare_updates("a", "b", *updates, module_order(model))

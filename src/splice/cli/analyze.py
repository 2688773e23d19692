"""`splice analyze`: the norms, spectra and intruder dimensions of an adapter's weight updates,
or the similarity of two adapters."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from splice.analysis.config import DEFAULT_EPSILON, DEFAULT_EPSILONS, DEFAULT_TOP_K, AnalysisConfig
from splice.analysis.plots import plot_analysis
from splice.analysis.report import (AdapterAnalysis, AdapterComparison, analyze_folder,
                                    compare_folders)
from splice.config.base import ConfigError, help_for
from splice.tables import format_table

NAME = "analyze"
HELP = "diagnose an adapter's updates (norms, spectra, intruder dimensions) or compare two"
DESCRIPTION = (
    "For every weight matrix the adapter changes: ‖ΔW‖ and ‖ΔW‖/‖W₀‖, the singular values of ΔW "
    "and its effective rank (exp of the entropy of σ/Σσ; how much of the rank budget r it uses), "
    "and its intruder dimensions (Shuttleworth et al. 2024): how many of the top-k singular "
    "vectors of W₀ + ΔW have |cosine| below ε with every singular vector of W₀, for a sweep of ε. "
    "Low-rank LoRA tends to show them, full fine-tuning does not; they track forgetting. "
    "With --compare, the cosine between two adapters' updates per matrix and overall (1: the "
    "same update, 0: unrelated, −1: opposite). Works for LoRA, DoRA and IA³ adapters.")
EPILOG = """examples:
  splice analyze --model smollm2-135m --adapter runs/sql --png runs/sql/analysis
  splice analyze --model smollm2-135m --adapter runs/sql --top-k 10 --epsilon 0.3,0.5,0.7 \\
      --json runs/sql/analysis.json
  splice analyze --model smollm2-135m --compare runs/customer-a runs/customer-b"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the base model the adapter was trained on")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="the adapter folder to analyse")
    source.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"),
                        help="two adapter folders to compare")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                        help=help_for(AnalysisConfig, "top_k"))
    parser.add_argument("--epsilon", type=_numbers, default=None,
                        help=help_for(AnalysisConfig, "epsilons") + " Comma-separated; default "
                        + ",".join(f"{e:g}" for e in DEFAULT_EPSILONS) + ". The summary "
                        f"counts at ε={DEFAULT_EPSILON:g}.")
    parser.add_argument("--png", metavar="PREFIX", default=None,
                        help="write PREFIX-spectra.png and PREFIX-intruders.png (or spectra.png "
                        "and intruders.png inside PREFIX when it is a folder)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write every number as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    if args.compare:
        if args.png:
            raise ConfigError("--png draws one adapter's analysis; use it with --adapter, not "
                              "--compare")
        comparison = compare_folders(args.model, *args.compare)
        print(comparison_text(comparison, args.compare))
        _write_json(args.json, comparison.to_dict())
        return 0
    epsilons = tuple(args.epsilon) if args.epsilon else DEFAULT_EPSILONS
    analysis = analyze_folder(args.model, args.adapter, args.top_k, epsilons)
    print(analysis_text(analysis))
    if args.png:
        for path in plot_analysis(analysis, args.png):
            print(f"wrote {path}")
    _write_json(args.json, analysis.to_dict())
    return 0


def analysis_text(analysis: AdapterAnalysis) -> str:
    s, eps = analysis.summary, analysis.summary.epsilon
    rows = [[m.path, f"{m.shape[0]}x{m.shape[1]}", m.rank_budget or "-", f"{m.delta_norm:.4g}",
             f"{m.relative_norm:.3%}", f"{m.spectrum.values[0]:.4g}" if m.spectrum.values else "-",
             f"{m.spectrum.entropy_rank:.2f}", m.spectrum.energy_ranks[0.9],
             m.spectrum.energy_ranks[0.99], m.intruders.count(eps)] for m in analysis.matrices]
    table = format_table(["module", "shape", "r", "‖ΔW‖", "‖ΔW‖/‖W₀‖", "σ₁", "eff. rank",
                          "90%", "99%", f"intruders@{eps:g}"], rows,
                         [False, True, True, True, True, True, True, True, True, True])
    budget = (f" ({s.mean_budget_use:.0%} of the rank budget)" if s.mean_budget_use is not None
              else "")
    sweep = ", ".join(f"ε={e:g}: {c}" for e, c in s.intruder_counts.items())
    return (f"{table}\n\n{s.adapter} ({s.method}), {s.matrices} matrices: ‖ΔW‖ = {s.delta_norm:.4g}"
            f" ({s.relative_norm:.3%} of ‖W₀‖ over these matrices); mean effective rank "
            f"{s.mean_entropy_rank:.2f}{budget}\n"
            f"intruder dimensions in the top {s.top_k}: {s.intruder_dimensions} at ε={eps:g} "
            f"(in {s.matrices_with_intruders} matrices); sweep {sweep}")


def comparison_text(comparison: AdapterComparison, folders: list[str]) -> str:
    rows = [[m.path, f"{m.norm_a:.4g}", f"{m.norm_b:.4g}",
             "-" if m.cosine is None else f"{m.cosine:+.4f}"] for m in comparison.matrices]
    table = format_table(["module", "‖ΔW_A‖", "‖ΔW_B‖", "cosine"], rows,
                         [False, True, True, True])
    shared = sum(m.cosine is not None for m in comparison.matrices)
    return (f"{table}\n\nA = {folders[0]}, B = {folders[1]}\n"
            f"cosine of the whole updates: {comparison.cosine:+.4f}; mean over the {shared} "
            f"matrices both adapt: {comparison.mean_cosine:+.4f} ('-': only one adapter changes "
            "that matrix)")


def _write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")


def _numbers(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. "
                                         "0.3,0.5,0.7") from None

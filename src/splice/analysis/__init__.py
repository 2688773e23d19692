"""Adapter diagnostics: ΔW norms and spectra, effective rank, intruder dimensions, and the
similarity of two adapters. The tensor math (spectrum, intruders, similarity) is pure; report.py
reads it off a model."""

from splice.analysis.config import AnalysisConfig
from splice.analysis.intruders import BaseSVDCache, IntruderCounts, intruder_dimensions
from splice.analysis.report import (AdapterAnalysis, AdapterComparison, AdapterSummary,
                                    MatrixAnalysis, MatrixComparison, analyze_adapter,
                                    analyze_folder, compare_adapters, compare_folders)
from splice.analysis.spectrum import (Spectrum, dense_singular_values, energy_rank,
                                      entropy_effective_rank, factor_singular_values)

__all__ = [
    "AdapterAnalysis", "AdapterComparison", "AdapterSummary", "AnalysisConfig", "BaseSVDCache",
    "IntruderCounts", "MatrixAnalysis", "MatrixComparison", "Spectrum", "analyze_adapter",
    "analyze_folder", "compare_adapters", "compare_folders", "dense_singular_values",
    "energy_rank", "entropy_effective_rank", "factor_singular_values", "intruder_dimensions",
]

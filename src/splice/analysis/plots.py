"""PNG figures of an AdapterAnalysis: the ΔW spectra per matrix type and layer, and the intruder
counts per layer over the ε sweep."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from splice.analysis.report import AdapterAnalysis, MatrixAnalysis  # noqa: E402

#: singular values drawn per matrix: a low-rank update has r of them, a dense one min(out, in)
MAX_VALUES_DRAWN = 64


def plot_spectra(analysis: AdapterAnalysis, path: str | Path) -> Path:
    """One panel per matrix type (q_proj, v_proj, …), one line per layer (coloured by depth):
    σᵢ(ΔW) against i, log scale. A steep fall means the update uses few of its directions."""
    kinds = _by_kind(analysis.matrices)
    cols = min(len(kinds), 4) or 1
    rows = max(math.ceil(len(kinds) / cols), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), dpi=110,
                             squeeze=False)
    depth = max((m.layer or 0 for m in analysis.matrices), default=0) or 1
    cmap = plt.get_cmap("viridis")
    for ax, (kind, matrices) in zip(axes.flat, kinds.items()):
        for i, m in enumerate(matrices):
            values = [v for v in m.spectrum.values[:MAX_VALUES_DRAWN] if v > 0]
            if values:
                colour = cmap((m.layer if m.layer is not None else i) / depth)
                ax.semilogy(range(1, len(values) + 1), values, color=colour, linewidth=1)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("i", fontsize=8)
        ax.set_ylabel("σᵢ(ΔW)", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    fig.suptitle(f"ΔW spectra of adapter {analysis.summary.adapter!r} (colour: layer)",
                 fontsize=10)
    return _save(fig, path)


def plot_intruders(analysis: AdapterAnalysis, path: str | Path) -> Path:
    """Intruder dimensions per layer (summed over the layer's matrices), one line per ε."""
    per_layer: dict[int, dict[float, int]] = defaultdict(lambda: defaultdict(int))
    for i, m in enumerate(analysis.matrices):
        for epsilon, count in m.intruders.counts.items():
            per_layer[m.layer if m.layer is not None else i][epsilon] += count
    layers = sorted(per_layer)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    cmap = plt.get_cmap("plasma")
    epsilons = analysis.config.epsilons
    for j, epsilon in enumerate(epsilons):
        ax.plot(layers, [per_layer[layer][epsilon] for layer in layers], "o-", markersize=3,
                color=cmap(j / max(len(epsilons) - 1, 1)), label=f"ε={epsilon:g}")
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"intruders in top {analysis.config.top_k}")
    ax.set_title(f"intruder dimensions of adapter {analysis.summary.adapter!r}: "
                 f"{analysis.summary.intruder_dimensions} at ε={analysis.summary.epsilon:g}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_analysis(analysis: AdapterAnalysis, prefix: str | Path) -> tuple[Path, Path]:
    """Both figures: `<prefix>-spectra.png` and `<prefix>-intruders.png`, or `spectra.png` and
    `intruders.png` inside `prefix` when it is a folder (exists, or ends with a slash)."""
    text = str(prefix)
    if text.endswith(("/", "\\")) or Path(text).is_dir():
        folder = Path(text)
        return (plot_spectra(analysis, folder / "spectra.png"),
                plot_intruders(analysis, folder / "intruders.png"))
    return (plot_spectra(analysis, text + "-spectra.png"),
            plot_intruders(analysis, text + "-intruders.png"))


def _by_kind(matrices: tuple[MatrixAnalysis, ...]) -> dict[str, list[MatrixAnalysis]]:
    kinds: dict[str, list[MatrixAnalysis]] = defaultdict(list)
    for m in matrices:
        kinds[m.kind].append(m)
    return dict(kinds)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

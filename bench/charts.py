"""Grouped bar charts for bench/RESULTS.md: one PNG per figure, one panel per measured quantity,
with the target drawn as a dashed line where the figure has one."""

from __future__ import annotations

from dataclasses import dataclass
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"splice": "#1f77b4", "peft": "#ff7f0e", "bitsandbytes": "#ff7f0e"}


@dataclass(frozen=True)
class Panel:
    """Bars of one quantity: groups[x label][series] = value, optionally a target line."""

    ylabel: str
    groups: dict[str, dict[str, float]]
    target: float | None = None
    target_label: str = ""
    log: bool = False


def draw(panels: list[Panel], title: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), dpi=110,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        draw_panel(ax, panel)
    wrapped = "\n".join(textwrap.fill(line, 62 * len(panels)) for line in title.splitlines())
    fig.suptitle(wrapped, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def draw_panel(ax, panel: Panel) -> None:
    series = list(dict.fromkeys(s for values in panel.groups.values() for s in values))
    width = 0.8 / max(len(series), 1)
    for j, name in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(panel.groups))]
        heights = [values.get(name, 0.0) for values in panel.groups.values()]
        # one series: colour each bar by its group (splice, peft, ...) instead
        colors = ([color_of(group) for group in panel.groups] if len(series) == 1
                  else color_of(name))
        ax.bar(xs, heights, width, label=name if len(series) > 1 else None, color=colors)
    ax.set_xticks(range(len(panel.groups)))
    ax.set_xticklabels(list(panel.groups), rotation=20 if len(panel.groups) > 4 else 0,
                       fontsize=8)
    ax.set_ylabel(panel.ylabel)
    if panel.log:
        ax.set_yscale("log")
    if panel.target is not None:
        ax.axhline(panel.target, color="crimson", linestyle="--", linewidth=1.2,
                   label=panel.target_label or "target")
    if len(series) > 1 or panel.target is not None:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def color_of(label: str) -> str:
    return next((c for k, c in COLORS.items() if label.startswith(k)), "#7f7f7f")

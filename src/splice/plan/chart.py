"""A PNG of memory plans: one stacked bar per plan, its parts in GiB, the peak total marked."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from splice.plan.estimate import MemoryPlan  # noqa: E402

GIB = 2 ** 30
PARTS = (("frozen_weights", "frozen weights", "#9aa5b1"),
         ("trainable_weights", "trainable weights", "#3e7cb1"),
         ("gradients", "gradients", "#f2a541"),
         ("optimizer_state", "optimizer state", "#81b29a"),
         ("activations", "activations", "#e07a5f"))


def plot_plans(plans: Sequence[MemoryPlan], path: str | Path, title: str = "") -> Path:
    """Write a bar chart of `plans` (labelled by method) to `path` and return it.

    The bars stack the parts; a black tick marks `total`, the peak, which sits below the stack
    when gradients and activations do not peak together (see splice.plan.estimate)."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(plans), 4.8))
    x = range(len(plans))
    bottom = [0.0] * len(plans)
    for field, label, color in PARTS:
        values = [getattr(p, field) / GIB for p in plans]
        ax.bar(x, values, bottom=bottom, color=color, label=label, width=0.6)
        bottom = [b + v for b, v in zip(bottom, values)]
    totals = [p.total / GIB for p in plans]
    ax.scatter(x, totals, marker="_", s=1600, color="black", linewidths=2.5, zorder=3,
               label="peak total")
    for i, total in enumerate(totals):
        ax.annotate(f"{total:,.1f}", (i, max(total, bottom[i])), textcoords="offset points",
                    xytext=(0, 4), ha="center", fontsize=9)
    ax.set_xticks(list(x), [p.settings.method for p in plans])
    ax.set_ylabel("GiB")
    ax.set_title(title or plans[0].model, fontsize=10)
    ax.legend(fontsize=8, loc="upper right", markerscale=0.5)
    ax.margins(y=0.12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

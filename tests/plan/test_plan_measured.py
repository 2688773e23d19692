"""The planner against real training: SmolLM2 under full fine-tuning, LoRA and QLoRA.

Each method trains a few steps through splice's own training step in a fresh subprocess
(bench/plan_validation.py, which explains what it measures: the peak RSS above the process's
baseline, with glibc returning every buffer over 64 KiB on free), at two batch sizes, and the
planner's total for the same settings must lie within 15% of the measured peak.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "plan_validation.py"
TOLERANCE = 0.15


def load_bench():
    spec = importlib.util.spec_from_file_location("plan_validation", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_planned_total_is_within_15_percent_of_the_measured_peak(method):
    bench = load_bench()
    rows = bench.spawn(method, [1, 4], seq=64, steps=2, grad_checkpointing=False, threads=2)
    assert [r["batch"] for r in rows] == [1, 4]
    for row in rows:
        assert row["plan"]["settings"]["method"] == method
        assert abs(row["ratio"] - 1) <= TOLERANCE, bench.format_rows(rows)
    # the larger batch needs more, in the plan as in the measurement
    assert rows[1]["measured_bytes"] > rows[0]["measured_bytes"] or method == "full"
    assert rows[1]["planned_bytes"] >= rows[0]["planned_bytes"]

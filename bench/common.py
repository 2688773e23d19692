"""What the benchmarks share: where results go, the child-process environment, memory readings,
and timing contenders in alternation.

Every benchmark writes bench/results/<name>.json (<name>_quick.json for --quick). The folder is
$SPLICE_BENCH_RESULTS when that is set: bench/run_all.py --output DIR points every benchmark at
DIR/results, so a smoke run (CI, tests) leaves the committed results alone.

Note: alternation. Contenders run one after another within each round, and the order reverses
every round (a b c, c b a, a b c, ...), so a burst of load from another process, or a warming
cache, hits every contender alike instead of whichever ran first. Ratios are taken within a
round (neighbours in time) and the median over rounds is reported; the median of per-round
ratios is steadier than the ratio of medians on a shared machine.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping

BENCH = Path(__file__).resolve().parent
RESULTS_ENV = "SPLICE_BENCH_RESULTS"


def results_dir() -> Path:
    folder = Path(os.environ.get(RESULTS_ENV) or BENCH / "results")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def result_path(name: str, quick: bool = False, suffix: str = ".json") -> Path:
    return results_dir() / f"{name}{'_quick' if quick else ''}{suffix}"


def write_json(name: str, payload: Mapping[str, Any], quick: bool = False) -> Path:
    """Write a result, stamped with when it was measured and how loaded the machine was."""
    path = result_path(name, quick)
    stamp = {"measured_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    path.write_text(json.dumps({**payload, **stamp}, indent=1) + "\n")
    return path


def child_env(omp_wait_policy: str | None = "PASSIVE") -> dict[str, str]:
    """The environment for a benchmark's child process. OMP_WAIT_POLICY=PASSIVE: on a shared,
    oversubscribed machine idle OpenMP threads that spin make 2-thread runs several times
    slower and far noisier."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    return env


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of fn takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(calls: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
              between: Callable[[str], Any] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each contender over `rounds` timed rounds, after `warmup` untimed
    ones; the order reverses every round (see Note: alternation). `between(name)` runs after
    each call, untimed (e.g. to undo what the call did)."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds = timed(calls[name])
            if between is not None:
                between(name)
            if i >= warmup:
                times[name].append(seconds)
    return times


def per_round(times: Mapping[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """numerator's time / denominator's time within each round (see Note: alternation)."""
    return [n / d for n, d in zip(times[numerator], times[denominator])]


def median_ratio(times: Mapping[str, list[float]], numerator: str, denominator: str) -> float:
    return statistics.median(per_round(times, numerator, denominator))


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(ts) for name, ts in times.items()}


def randomize_lora(model, seed: int, scale: float = 0.02) -> None:
    """Non-zero random values for every LoRA tensor (B starts at zero, which would make every
    adapter equal the base)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def peft_twin(base, adapted, names: list[str], rank: int, alpha: int):
    """peft's model over `base` (wrapped in place) holding the LoRA adapters `names` with the
    values they have in splice's `adapted` (all-linear, as the benchmarks attach them)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear")
    peft_model = get_peft_model(base, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    # Both name an adapter's tensors alike (…q_proj.lora_A.a3.weight), peft under its prefix.
    lora = {f"base_model.model.{k}": v for k, v in adapted.state_dict().items() if "lora_" in k}
    missing = set(lora) - set(peft_model.state_dict())
    if missing:
        raise SystemExit(f"peft's model lacks adapter tensors {sorted(missing)[:3]}")
    peft_model.load_state_dict(lora, strict=False)
    return peft_model.eval()

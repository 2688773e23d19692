"""Adapter load from the library into a resident SmolLM2-135M: milliseconds per load.

    .venv/bin/python bench/library_load.py [--quick] [--reps 9] [--threads 2]

Setup: SmolLM2-135M-Instruct in fp32, a LoRA adapter of rank 16 on every linear layer (alpha
32; A and B random, so nothing is zero), saved with splice.save_adapter and added to a library
in a temporary folder (bound to the resident model).

    library    library.load_into(model, "demo")            (fingerprint check + load_adapter)
    direct     splice.load_adapter(model, original_folder)  (the same files, no library)

After each load the adapter is deleted again (not timed), so every load attaches to the bare
model. The two alternate (library, direct, library, ...) so machine noise hits both alike;
"ratio" is the median over rounds of library / direct within the round. The first load_into on
a model hashes its base weights (model_fingerprint, ~1 s) and is reported on its own
("first_load_into_ms", with "fingerprint_ms" for the hash alone); later loads reuse the
fingerprint while the base weights are unchanged. "add_ms" times library.add of the same folder
(copy, fsync, and the fit check that attaches the adapter to the model and removes it); the
first of them also hashes the model, which binds the new library.

Writes bench/results/library_load.json (library_load_quick.json for --quick: 1 load each, 1 add).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

MODEL = "smollm2-135m"
RANK, ALPHA = 16, 32


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def make_adapter(model, folder: Path) -> int:
    """Save a random all-linear LoRA of rank 16 to `folder`; return its parameter count."""
    import copy

    import torch

    import splice

    adapted = splice.attach(copy.deepcopy(model), splice.LoRAConfig(
        rank=RANK, alpha=ALPHA, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(0)
    count = 0
    with torch.no_grad():
        for param in adapted.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)
                count += param.numel()
    splice.save_adapter(adapted, folder)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 load each, 1 add")
    parser.add_argument("--reps", type=int, default=9, help="timed loads per contender")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.reps = 1

    import torch

    import splice
    from splice.models import model_fingerprint

    torch.set_num_threads(args.threads)
    model, _ = splice.load_model(MODEL)
    with tempfile.TemporaryDirectory(prefix="library-bench-") as tmp:
        source = Path(tmp) / "adapter"
        params = make_adapter(model, source)
        size = sum(p.stat().st_size for p in source.iterdir())
        fingerprint_ms = timed_ms(lambda: model_fingerprint(model))
        library = splice.AdapterLibrary(Path(tmp) / "lib")
        add_ms = [timed_ms(lambda: library.add("demo", source, model=model))]
        for i in range(0 if args.quick else 2):
            add_ms.append(timed_ms(lambda: library.add(f"copy{i}", source, model=model)))
        # A fresh model object, so the first load_into hashes its weights as a new process would.
        model, _ = splice.load_model(MODEL)
        first_ms = timed_ms(lambda: library.load_into(model, "demo"))
        splice.delete_adapter(model, "demo")
        contenders = {
            "library": (lambda: library.load_into(model, "demo"), "demo"),
            "direct": (lambda: splice.load_adapter(model, source, "demo"), "demo"),
        }
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.reps):
            for name, (load, adapter) in contenders.items():
                times[name].append(timed_ms(load))
                splice.delete_adapter(model, adapter)
    ratios = [lib / direct for lib, direct in zip(times["library"], times["direct"])]
    result = {
        "model": MODEL, "adapter": {"method": "lora", "rank": RANK, "alpha": ALPHA,
                                    "targets": "all-linear", "params": params, "size_bytes": size},
        "threads": args.threads, "reps": args.reps, "quick": args.quick, "torch": torch.__version__,
        "load_average": list(os.getloadavg()[:2]),
        "fingerprint_ms": fingerprint_ms, "first_load_into_ms": first_ms,
        "load_into_ms_median": statistics.median(times["library"]),
        "load_adapter_ms_median": statistics.median(times["direct"]),
        "ratio_median": statistics.median(ratios),
        "add_ms": add_ms, "times_ms": times,
    }
    write_json("library_load", result, args.quick)
    print(f"adapter: LoRA r={RANK} all-linear, {params:,} params, {size / 2**20:.1f} MiB", file=sys.stderr)
    print(f"fingerprint (once per model): {fingerprint_ms:.0f} ms; first load_into: {first_ms:.0f} ms",
          file=sys.stderr)
    print(f"load_into: {result['load_into_ms_median']:.1f} ms median; load_adapter from the folder: "
          f"{result['load_adapter_ms_median']:.1f} ms; ratio {result['ratio_median']:.2f}", file=sys.stderr)
    print(f"add (copy + fit check; the first also hashes the model): {', '.join(f'{t:.0f}' for t in add_ms)} ms", file=sys.stderr)


if __name__ == "__main__":
    main()

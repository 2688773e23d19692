"""Load test of `splice serve` on SmolLM2-135M: concurrent clients over 1, 8 and 32 adapters.

    .venv/bin/python bench/serve_load.py [--quick] [--clients 8] [--requests 4] [--max-tokens 8]
                                         [--rounds 2] [--threads 2]

Setup: the server (engine + FastAPI app under uvicorn) on a free loopback port, in this process;
a library of 32 LoRA adapters (all-linear, rank 8, random non-zero A and B, seeded, so they all
differ); ServeConfig(max_batch=clients, max_resident=32). An untimed warm-up sends one request
to every adapter, so all are attached and the stacked weights built: the runs measure the
steady state of a server whose adapters are resident.

A run "over N adapters": `--clients` threads, each an httpx client sending `--requests`
completions one after another (greedy, max_tokens fixed, short prompts), request j of client c
on adapter (c·requests + j) mod N. Reported per run: completion tokens per second (tokens from
`usage` over the run's wall time), p50 / p99 latency of a request, requests answered and
dropped (any non-200 answer or transport error is a drop). The three runs alternate within each
round, the order reversing every round (bench/common.py, Note: alternation); the ratio
"32 vs 1" is the median over rounds of the per-round throughput ratio (target >= 0.8).

Writes bench/results/serve_load.json (serve_load_quick.json for --quick: 4 clients × 8
requests × 4 tokens, 1 round). Every run sends at least 32 requests, so the run over 32
adapters touches each of them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench/common.py child_env
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import randomize_lora, write_json  # noqa: E402

MODEL = "smollm2-135m"
COUNTS = (1, 8, 32)
PROMPTS = ["The weather today is", "My favourite food is", "Once upon a time",
           "The best way to learn is", "In the year 2050,", "A good friend is someone who"]


def build_library(folder: Path, count: int, rank: int):
    """A library of `count` LoRA adapters for SmolLM2, and the model (adapters detached)."""
    import splice
    from splice.library import AdapterLibrary

    model, tokenizer = splice.load_model(MODEL)
    library = AdapterLibrary(folder / "library")
    splice.attach(model, splice.LoRAConfig(rank=rank, alpha=2 * rank,
                                           target_modules="all-linear"), "made")
    for i in range(count):
        randomize_lora(model, seed=i, scale=0.02)
        splice.save_adapter(model, folder / f"a{i}", "made")
    splice.delete_adapter(model, "made")
    for i in range(count):
        library.add(f"a{i}", folder / f"a{i}", model=model if i == 0 else None)
    return model, tokenizer, library


def client_run(url: str, names: list[str], max_tokens: int, out: list) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=600) as client:
        for j, name in enumerate(names):
            body = {"model": name, "prompt": PROMPTS[j % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0}
            start = time.perf_counter()
            try:
                response = client.post("/v1/completions", json=body)
                ok = response.status_code == 200
                tokens = response.json()["usage"]["completion_tokens"] if ok else 0
            except httpx.HTTPError:
                ok, tokens = False, 0
            out.append((ok, tokens, time.perf_counter() - start))


def run_load(url: str, adapters: int, args) -> dict:
    results: list = []
    threads = []
    for c in range(args.clients):
        names = [f"a{(c * args.requests + j) % adapters}" for j in range(args.requests)]
        threads.append(threading.Thread(target=client_run,
                                        args=(url, names, args.max_tokens, results)))
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies = sorted(t for ok, _, t in results if ok)
    tokens = sum(n for _, n, _ in results)
    return {"adapters": adapters, "wall_s": wall, "tokens": tokens,
            "tokens_per_s": tokens / wall,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
            "answered": sum(ok for ok, _, _ in results),
            "dropped": args.clients * args.requests - sum(ok for ok, _, _ in results)}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))
    return values[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client per run")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.max_tokens, args.rounds = 4, 8, 4, 1

    import torch

    from splice.serving import Engine, ServeConfig
    from splice.serving.api import create_app
    from splice.serving.server import ServerThread

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, library = build_library(Path(tmp), max(COUNTS), args.rank)
        setup_s = time.perf_counter() - started
        engine = Engine(model, tokenizer, library,
                        ServeConfig(max_batch=args.clients, max_queue=max(4 * args.clients, max(COUNTS)),
                                    max_resident=max(COUNTS)), base_name=MODEL).start()
        try:
            with ServerThread(create_app(engine)) as server:
                warm = time.perf_counter()
                # all at once: loads that finish together are attached in one pass
                warmers = [threading.Thread(target=client_run,
                                            args=(server.url, [f"a{i}"], 1, []))
                           for i in range(max(COUNTS))]
                for thread in warmers:
                    thread.start()
                for thread in warmers:
                    thread.join()
                warm_s = time.perf_counter() - warm
                runs: dict[int, list[dict]] = {n: [] for n in COUNTS}
                for r in range(args.rounds):
                    for n in (COUNTS if r % 2 == 0 else COUNTS[::-1]):
                        runs[n].append(run_load(server.url, n, args))
                        print(f"round {r}: {n:2d} adapters: {runs[n][-1]['tokens_per_s']:.1f} "
                              f"tok/s", flush=True)
        finally:
            engine.close()
    report(args, runs, setup_s, warm_s)


def report(args, runs: dict[int, list[dict]], setup_s: float, warm_s: float) -> None:
    table = []
    for n, rows in runs.items():
        latencies = [row[k] for row in rows for k in ("p50_s",) if row[k] is not None]
        table.append({
            "adapters": n,
            "tokens_per_s": statistics.median(row["tokens_per_s"] for row in rows),
            "p50_s": statistics.median(latencies) if latencies else None,
            "p99_s": max((row["p99_s"] for row in rows if row["p99_s"] is not None), default=None),
            "answered": sum(row["answered"] for row in rows),
            "dropped": sum(row["dropped"] for row in rows)})
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(runs[1], runs[32])]
    ratio = statistics.median(ratios)
    print(f"\n{args.clients} clients × {args.requests} requests × {args.max_tokens} tokens, "
          f"{args.rounds} round(s), {args.threads} threads; setup {setup_s:.0f} s, warm-up "
          f"(32 adapter loads) {warm_s:.0f} s")
    print("| adapters | tokens/s | p50 latency (s) | p99 latency (s) | answered | dropped |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in table:
        print(f"| {row['adapters']} | {row['tokens_per_s']:.1f} | {row['p50_s']:.2f} | "
              f"{row['p99_s']:.2f} | {row['answered']} | {row['dropped']} |")
    print(f"throughput 32 vs 1 adapter: {ratio:.2f}x (target >= 0.8; per round "
          f"{', '.join(f'{r:.2f}' for r in ratios)})")
    write_json("serve_load", {
        "model": MODEL, "clients": args.clients, "requests_per_client": args.requests,
        "max_tokens": args.max_tokens, "rounds": args.rounds, "threads": args.threads,
        "rank": args.rank, "setup_s": setup_s, "warmup_s": warm_s, "table": table,
        "ratio_32_vs_1": ratio, "ratios_per_round": ratios, "runs": runs}, quick=args.quick)


if __name__ == "__main__":
    main()

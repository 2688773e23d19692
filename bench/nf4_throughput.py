"""NF4 quantize / dequantize throughput: splice.quant vs bitsandbytes, on CPU.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/nf4_throughput.py [--quick] [--threads 2]
        [--reps 7] [--chunk N] [--shape 4096x4096]

A 4096x4096 fp32 matrix (--quick: 1024x1024, 2 repetitions), block size 64. Each case
warms both implementations up once, then alternates them rep by rep so that machine noise
hits both alike (bench/common.py, Note: alternation); we report medians. GB/s counts fp32 bytes: read by quantize, written by
dequantize. Both produce the same bytes (checked before timing).

Two dequantize rows per setting: "dequantize" returns a fresh tensor on both sides (the same
work); "dequantize out=" has splice write into one preallocated buffer reused across calls,
as a layer that dequantizes every forward can, against bitsandbytes' fresh tensor (its CPU
backend has no out=). A fresh fp32 tensor over the allocator's mmap threshold (32 MB) is new
pages on every call, and faulting them in costs more than decoding here: the out= row shows
the decoding alone. Writes bench/results/nf4_throughput.json (nf4_throughput_<shape>.json with
--shape; --quick adds _quick).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from splice.quant import dequantize_nf4, quantize_nf4
from splice.quant.nf4 import DEFAULT_CHUNK_ELEMENTS, DEFAULT_DEQUANT_CHUNK_ELEMENTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import alternate, medians, write_json  # noqa: E402


def bnb_functions():
    import bitsandbytes.functional as bnbf

    def quantize(w: torch.Tensor, double_quant: bool):
        return bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64,
                                  compress_statistics=double_quant)

    return quantize, lambda packed_state: bnbf.dequantize_4bit(*packed_state)


def race(ours, theirs, reps: int) -> tuple[float, float]:
    """Median seconds of ours() and theirs(), after one warm-up each, alternating."""
    times = medians(alternate({"splice": ours, "bnb": theirs}, reps))
    return times["splice"], times["bnb"]


def check_same_bytes(w: torch.Tensor, bnb_quantize) -> None:
    packed, state = bnb_quantize(w, True)
    q = quantize_nf4(w, double_quant=True)
    if not (torch.equal(q.packed, packed.view(-1)) and torch.equal(q.absmax, state.absmax)):
        raise SystemExit("splice and bitsandbytes disagree on the NF4 bytes; fix that first")


def run(shape: tuple[int, int], reps: int, chunk: int | None) -> list[dict]:
    bnb_quantize, bnb_dequantize = bnb_functions()
    q_chunk = {"chunk_elements": chunk or DEFAULT_CHUNK_ELEMENTS}
    dq_chunk = {"chunk_elements": chunk or DEFAULT_DEQUANT_CHUNK_ELEMENTS}
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02  # (rows, cols) fp32
    buffer = torch.empty(shape)  # reused by the out= rows
    check_same_bytes(w, bnb_quantize)
    gigabytes = w.numel() * 4 / 1e9
    rows = []
    for dq in (True, False):
        ours, theirs = race(lambda: quantize_nf4(w, double_quant=dq, **q_chunk),
                                 lambda: bnb_quantize(w, dq), reps)
        rows.append(dict(op="quantize", double_quant=dq, splice_s=ours, bnb_s=theirs))
        q, packed_state = quantize_nf4(w, double_quant=dq), bnb_quantize(w, dq)
        ours, theirs = race(lambda: dequantize_nf4(q, **dq_chunk),
                                 lambda: bnb_dequantize(packed_state), reps)
        rows.append(dict(op="dequantize", double_quant=dq, splice_s=ours, bnb_s=theirs))
        ours, theirs = race(lambda: dequantize_nf4(q, out=buffer, **dq_chunk),
                                 lambda: bnb_dequantize(packed_state), reps)
        rows.append(dict(op="dequantize out=", double_quant=dq, splice_s=ours, bnb_s=theirs))
    for row in rows:
        row |= dict(splice_gbps=gigabytes / row["splice_s"], bnb_gbps=gigabytes / row["bnb_s"],
                    ratio=row["bnb_s"] / row["splice_s"])
    return rows


def print_table(rows: list[dict], shape: tuple[int, int], threads: int, reps: int,
                chunk: int | None) -> None:
    chunks = f"{chunk}" if chunk else f"{DEFAULT_CHUNK_ELEMENTS} / {DEFAULT_DEQUANT_CHUNK_ELEMENTS}"
    print(f"NF4, {shape[0]}x{shape[1]} fp32, block 64, {threads} threads, median of {reps}, "
          f"splice chunks {chunks} elements")
    print(f"{'op':<17}{'dq':<6}{'splice GB/s':>12}{'bnb GB/s':>10}{'splice/bnb':>12}")
    for r in rows:
        print(f"{r['op']:<17}{'on' if r['double_quant'] else 'off':<6}"
              f"{r['splice_gbps']:>12.2f}{r['bnb_gbps']:>10.2f}{r['ratio']:>11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024x1024, 2 repetitions")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per case")
    parser.add_argument("--chunk", type=int, default=None,
                        help="splice's chunk_elements for both (default: each function's own)")
    parser.add_argument("--shape", default=None,
                        help="ROWSxCOLS instead of 4096x4096, e.g. 1536x576 (a SmolLM2 MLP)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape, reps = ((1024, 1024), 2) if args.quick else ((4096, 4096), args.reps)
    if args.shape:
        shape = tuple(int(d) for d in args.shape.lower().split("x"))
    load_before = os.getloadavg()[0]
    rows = run(shape, reps, args.chunk)
    print_table(rows, shape, args.threads, reps, args.chunk)
    load = (load_before, os.getloadavg()[0])
    print(f"load average {load[0]:.1f} -> {load[1]:.1f} on {os.cpu_count()} cores "
          "(other processes skew timings)")
    summary = dict(shape=list(shape), threads=args.threads, reps=reps, chunk=args.chunk,
                   load_average=load, torch=torch.__version__, rows=rows)
    name = f"nf4_throughput_{args.shape}" if args.shape else "nf4_throughput"
    write_json(name, summary, args.quick)


if __name__ == "__main__":
    main()

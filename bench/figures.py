"""The figures of bench/RESULTS.md: for each, what it compares, the target it is held to, and how
its table, checks and chart come out of a benchmark's JSON."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

from charts import Panel


@dataclass(frozen=True)
class Check:
    """One measured figure against its target; met is None where no number is set."""

    what: str
    value: float | bool | None
    target: str
    met: bool | None


@dataclass(frozen=True)
class Section:
    headers: list[str]
    rows: list[list[str]]
    checks: list[Check]
    panels: list[Panel]
    notes: list[str]


@dataclass(frozen=True)
class Figure:
    key: str                               # the chart's file stem
    title: str
    result: str                            # the JSON's stem in results/
    compares: str
    target: str
    build: Callable[[dict[str, Any]], Section]
    chart: str | None = None               # a PNG the benchmark draws itself, instead of ours


def num(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def adapters(count: str) -> str:
    return f"{count} adapter{'' if count == '1' else 's'}"


def at_most(what: str, value: float, limit: float) -> Check:
    return Check(what, value, f"≤ {limit:g}", value <= limit)


def at_least(what: str, value: float, limit: float) -> Check:
    return Check(what, value, f"≥ {limit:g}", value >= limit)


def lora_step(d: dict) -> Section:
    s = d["summary"]
    peft = s["peft"]
    time_ratio = {c: statistics.median(v["time_vs_peft_per_round"]) for c, v in s.items()}
    rows = [[c, num(v["step_s"], 3), num(v["cpu_s"], 3), num(v["peak_mb"], 0),
             num(v.get("train_peak_mb"), 0), num(time_ratio[c]),
             num(v["peak_mb"] / peft["peak_mb"])]
            for c, v in s.items()]
    peak_ratio = s["splice"]["peak_mb"] / peft["peak_mb"]
    return Section(
        ["contender", "step s", "cpu s", "peak RSS MB", "train peak MB", "time/peft", "peak/peft"],
        rows,
        [at_most("splice step time / peft's (per-round median)", time_ratio["splice"], 0.8),
         at_most("splice peak RSS / peft's", peak_ratio, 0.7)],
        [Panel("step time (s)", {c: {"step": v["step_s"]} for c, v in s.items()},
               0.8 * peft["step_s"], "target: 0.8 × peft"),
         Panel("peak RSS (MB)", {c: {"peak": v["peak_mb"]} for c, v in s.items()},
               0.7 * peft["peak_mb"], "target: 0.7 × peft")],
        [settings_line(d), "floor: the frozen model with no adapter and no optimizer, the least "
                           "work any adapter method can do per step"])


def qlora_step(d: dict) -> Section:
    s = d["summary"]
    lora, qlora = s["splice"], s["qlora"]
    time_ratio = statistics.median(qlora["time_vs_splice_per_round"])
    rows = [[c, num(v["step_s"], 3), num(v["cpu_s"], 3), num(v["peak_mb"], 0),
             num(v["after_load_mb"], 0), num(statistics.median(v["time_vs_splice_per_round"])),
             num(v["peak_mb"] / lora["peak_mb"])] for c, v in s.items()]
    return Section(
        ["contender", "step s", "cpu s", "peak RSS MB", "after load MB", "time/LoRA", "peak/LoRA"],
        rows,
        [Check("QLoRA step time / LoRA's", time_ratio, "none set: tracked", None),
         Check("QLoRA peak RSS / LoRA's", qlora["peak_mb"] / lora["peak_mb"], "none set: tracked",
               None)],
        [Panel("step time (s)", {"LoRA": {"step": lora["step_s"]},
                                 "QLoRA": {"step": qlora["step_s"]}}),
         Panel("peak RSS (MB)", {"LoRA": {"peak": lora["peak_mb"]},
                                 "QLoRA": {"peak": qlora["peak_mb"]}})],
        [settings_line(d), "both are splice: LoRA on the fp32 base vs LoRA on an NF4 base "
                           "dequantized on the fly"])


def dora_step(d: dict) -> Section:
    s = d["summary"]
    trainers = [c for c in ("splice", "peft", "splice-lora", "peft-lora") if c in s]
    rows = []
    for c in trainers:
        ref = "peft-lora" if c.endswith("-lora") else "peft"
        v = s[c]
        rows.append([c, num(v["step_s"], 3), num(v["cpu_s"], 3), num(v["peak_mb"], 0),
                     num(v.get(f"time_vs_{ref}")), num(v.get(f"cpu_vs_{ref}")),
                     num(v.get("time_vs_own_lora"))])
    checks = [at_most("splice DoRA step time / peft DoRA's (per-round median)",
                      s["splice"]["time_vs_peft"], 1.0)]
    notes = [settings_line(d), "time/peft: against peft's same method (DoRA or LoRA); "
                               "time/LoRA: what DoRA costs over LoRA in the same library"]
    if "layers" in s:
        notes.append(f"one adapted linear of each SmolLM2 shape, forward + backward: splice DoRA / "
                     f"peft DoRA {s['layers']['dora_vs_peft']:.2f}")
    if "merged" in s:
        m = s["merged"]
        notes.append(f"merged DoRA forward / base forward {m['merged_vs_base']:.3f}; "
                     f"max |Δ logits| merged vs unmerged {m['max_logit_diff_vs_unmerged']:.1e}")
    return Section(["trainer", "step s", "cpu s", "peak RSS MB", "time/peft", "cpu/peft",
                    "time/LoRA"], rows, checks,
                   [Panel("step time (s)", {c: {"step": s[c]["step_s"]} for c in trainers},
                          s["peft"]["step_s"], "target: peft DoRA")], notes)


def nf4(d: dict) -> Section:
    rows, checks, groups = [], [], {}
    for r in d["rows"]:
        label = f"{r['op']} ({'dq' if r['double_quant'] else 'no dq'})"
        rows.append([r["op"], "on" if r["double_quant"] else "off", num(r["splice_gbps"]),
                     num(r["bnb_gbps"]), num(r["ratio"])])
        if r["double_quant"] and r["op"] in ("quantize", "dequantize"):  # QLoRA's setting
            checks.append(at_least(f"{r['op']}: splice throughput / bitsandbytes'", r["ratio"],
                                   1.0))
        groups[label] = {"splice": r["splice_gbps"], "bitsandbytes": r["bnb_gbps"]}
    return Section(["op", "double quant", "splice GB/s", "bnb GB/s", "splice/bnb"], rows, checks,
                   [Panel("GB/s of fp32 weights", groups, log=True)],
                   [f"{d['shape'][0]}×{d['shape'][1]} fp32, block 64, {d['threads']} threads, "
                    f"median of {d['reps']}; load average {d['load_average'][0]:.1f} → "
                    f"{d['load_average'][1]:.1f}"])


def inference(d: dict) -> Section:
    s, c = d["summary"], d["checks"]
    fw, gen = s["forward"], s["generate"]
    rows = [[n, num(fw["median_s"][n], 3), num(fw["vs_base"][n]), num(gen["median_s"][n], 3),
             num(gen["vs_base"][n]), num(gen["ms_per_token"][n], 1)] for n in fw["median_s"]]
    limit = s["targets"]["merged_vs_base_forward"]
    checks = [at_most("merged forward / base forward", fw["vs_base"]["merged"], limit),
              at_most("merged generate / base generate", gen["vs_base"]["merged"], limit),
              at_most("max |Δ logits| merged vs unmerged adapter",
                      c["max_abs_logit_diff_merged_vs_unmerged"], 1e-3),
              Check("greedy tokens: merged = unmerged", c["greedy_tokens_merged_equal_unmerged"],
                    "equal", c["greedy_tokens_merged_equal_unmerged"])]
    st = d["settings"]
    return Section(["model", "forward s", "/base", "generate s", "/base", "ms/token"], rows, checks,
                   [Panel(f"forward {st['batch']}×{st['seq']} (s)",
                          {n: {"forward": t} for n, t in fw["median_s"].items()},
                          limit * fw["median_s"]["base"], f"target: merged ≤ {limit} × base"),
                    Panel(f"generate, ms per token ({st['new_tokens']} tokens)",
                          {n: {"generate": t} for n, t in gen["ms_per_token"].items()},
                          limit * gen["ms_per_token"]["base"],
                          f"target: merged ≤ {limit} × base")],
                   [f"{st['threads']} threads, median of {st['rounds']} alternating rounds; "
                    f"peft vs splice unmerged: max |Δ logits| "
                    f"{c['max_abs_logit_diff_peft_vs_splice']:.1e}; the adapter moves the logits "
                    f"by up to {c['max_abs_logit_diff_adapter_vs_base']:.2f} from the base"])


def mixed_batch(d: dict) -> Section:
    s, st = d["summary"], d["settings"]
    tokens = st["rows"] * st["seq"]
    per = s["per_count"]
    agreement = d["forwards"]["max_abs_logit_diff_splice_vs_peft"]
    rows = [[n, num(v["splice_mixed_s"], 3), num(v["peft_mixed_s"], 3),
             num(v["vs_single_throughput"]), num(v["vs_peft_mixed_throughput"]),
             num(v["bound_peft_mixed_vs_base"]), f"{agreement[n]:.1e}"] for n, v in per.items()]
    top = str(s["largest_count"])
    single = tokens / s["median_s"]["splice-single"]
    return Section(
        ["adapters", "splice s", "peft s", "splice thr / 1 adapter", "splice thr / peft",
         "peft/base (bound)", "max |Δ logits|"], rows,
        [at_least(f"{top} adapters: throughput / single adapter's", s["mixed_vs_single_throughput"],
                  0.85),
         at_least(f"{top} adapters: throughput / peft's mixed batch",
                  s["mixed_vs_peft_mixed_throughput"], 3.0),
         at_most("set_active_adapters median (ms)", s["switch_ms_median"], 1.0)],
        [Panel("tokens/s", {adapters(n): {"splice": tokens / v["splice_mixed_s"],
                                          "peft": tokens / v["peft_mixed_s"]}
                            for n, v in per.items()},
               0.85 * single, "target: 0.85 × one adapter")],
        [f"{st['rows']} rows × {st['seq']} tokens, row i on adapter i mod N, {st['threads']} "
         f"threads, median of {st['rounds']} alternating rounds; one adapter: "
         f"{s['median_s']['splice-single']:.3f} s, base {s['median_s']['base']:.3f} s; peft/base "
         "bounds how far any path can beat peft"])


def adapter_io(d: dict) -> Section:
    s = d["summary"]
    ops = ("save", "load", "hot-swap", "switch")
    rows = [[op, num(s[op]["splice_ms"], 2), num(s[op]["peft_ms"], 2), num(s[op]["splice_vs_peft"])]
            for op in ops]
    checks = [at_most(f"{op}: splice / peft", s[op]["splice_vs_peft"], 1.0) for op in ops]
    checks.append(at_most("switch median (ms)", s["switch"]["splice_ms"], 1.0))
    st = d["settings"]
    return Section(["operation", "splice ms", "peft ms", "splice/peft"], rows, checks,
                   [Panel("ms (log scale)", {op: {"splice": s[op]["splice_ms"],
                                                  "peft": s[op]["peft_ms"]} for op in ops},
                          log=True)],
                   [f"{st['adapters']} adapters loaded, {st['adapter_mb']:.1f} MB each; median of "
                    f"{st['rounds']} alternating rounds ({st['switches']} for switch); switch p90 "
                    f"{s['switch']['splice_p90_ms']:.2f} ms; max |Δ logits| splice vs peft after "
                    f"the same swaps {s['max_abs_logit_diff_after_swaps']:.1e}"])


def serve_load(d: dict) -> Section:
    table = d["table"]
    rows = [[str(r["adapters"]), num(r["tokens_per_s"], 1), num(r["p50_s"]), num(r["p99_s"]),
             str(r["answered"]), str(r["dropped"])] for r in table]
    first, last = table[0], table[-1]
    return Section(
        ["adapters", "tokens/s", "p50 latency s", "p99 latency s", "answered", "dropped"], rows,
        [at_least(f"{last['adapters']} adapters: tokens/s / {first['adapters']} adapter's "
                  "(per-round median)", d["ratio_32_vs_1"], 0.8),
         Check("requests dropped", sum(r["dropped"] for r in table), "0",
               sum(r["dropped"] for r in table) == 0)],
        [Panel("completion tokens/s", {adapters(str(r["adapters"])): {"splice": r["tokens_per_s"]}
                                       for r in table},
               0.8 * first["tokens_per_s"], f"target: 0.8 × {adapters(str(first['adapters']))}")],
        [f"{d['clients']} concurrent clients × {d['requests_per_client']} requests × "
         f"{d['max_tokens']} tokens per run, LoRA rank {d['rank']}, {d['threads']} threads, "
         f"median of {d['rounds']} alternating rounds; setup {d['setup_s']:.0f} s, warm-up "
         f"{d['warmup_s']:.0f} s"])


def loss_memory(d: dict) -> Section:
    rows = [[r["loss"], r["head"], str(r["chunk"] or "—"), num(r["time_s"], 3),
             num(r["peak_mb"], 0), num(r["time_vs_full"]), num(r["mem_vs_full"])]
            for r in d["rows"]]
    st = d["settings"]
    return Section(["loss", "head", "chunk", "time s", "peak MB", "time/full", "mem/full"], rows,
                   [Check("chunk-256 peak / full logits' peak (frozen head)",
                          next(r["mem_vs_full"] for r in d["rows"]
                               if r["chunk"] == 256 and r["head"] == "frozen"),
                          "none set: tracked", None)],
                   [Panel("peak MB", {f"{r['loss']} {r['chunk'] or ''} {r['head']}"
                                      .replace("  ", " "): {"peak": r["peak_mb"]}
                                      for r in d["rows"]})],
                   [f"V={st['vocab']}, d={st['dim']}, {st['batch']}×{st['seq']} tokens, forward + "
                    f"backward, median of {st['reps']}"])


def optimizer_curves(d: dict) -> Section:
    c = d["contenders"]
    rows = [[n, num(v["final_loss"], 4), f"{v['max_abs_dloss_vs_adamw']:.1e}",
             num(v["state_bytes_per_param"], 3), num(v["optimizer_step_time_vs_adamw"]),
             num(v["step_time_vs_adamw"])] for n, v in c.items()]
    st = d["setup"]
    return Section(["optimizer", "final loss", "max |Δloss| vs AdamW", "state B/param",
                    "opt step/AdamW", "step/AdamW"], rows,
                   [Check("AdamW8bit state bytes per parameter",
                          c["adamw8bit"]["state_bytes_per_param"], "none set: tracked", None)],
                   [], [f"{st['steps']} steps of batch {st['batch']}, LoRA r={st['lora_rank']}, "
                        f"lr {st['lr']}, {st['trainable']:,} trainable parameters"])


def library_load(d: dict) -> Section:
    rows = [["library.load_into", num(d["load_into_ms_median"], 1)],
            ["splice.load_adapter", num(d["load_adapter_ms_median"], 1)],
            ["first load_into (hashes the model)", num(d["first_load_into_ms"], 1)],
            ["model fingerprint", num(d["fingerprint_ms"], 1)]]
    return Section(["operation", "ms"], rows,
                   [Check("load_into / load_adapter", d["ratio_median"], "none set: tracked",
                          None)],
                   [Panel("ms", {"load_into": {"ms": d["load_into_ms_median"]},
                                 "load_adapter": {"ms": d["load_adapter_ms_median"]}})],
                   [f"median of {d['reps']} alternating loads, {d['threads']} threads"])


def settings_line(d: dict) -> str:
    st = d["settings"]
    return (f"batch {st['batch']}×{st['seq']}, {st['threads']} threads, median of {st['reps']} "
            f"fresh runs × {st['steps']} steps (alternating), OMP_WAIT_POLICY="
            f"{st['omp_wait_policy'] or 'unset'}")


FIGURES = (
    Figure("lora_step", "LoRA training step: time and peak memory vs peft", "train_step",
           "splice LoRA vs peft LoRA (and the frozen-model floor), one training step of "
           "SmolLM2-135M, all-linear rank 16, fp32",
           "step time ≤ 0.8 × peft's; peak RSS ≤ 0.7 × peft's", lora_step),
    Figure("dora_step", "DoRA training step vs peft's DoRA", "dora_step",
           "splice DoRA vs peft DoRA (use_dora=True), with both libraries' LoRA for context",
           "step time ≤ peft DoRA's", dora_step),
    Figure("qlora_step", "QLoRA step vs LoRA step", "train_step_splice_qlora",
           "splice LoRA on an NF4-quantized base vs on the fp32 base", "none set by the issue: "
           "tracked (QLoRA trades step time for a 4-bit base)", qlora_step),
    Figure("nf4_throughput", "NF4 quantize / dequantize throughput vs bitsandbytes",
           "nf4_throughput", "splice.quant vs bitsandbytes' CPU NF4, same bytes out",
           "at least bitsandbytes' throughput (the issue names no number; parity)", nf4),
    Figure("inference_latency", "Inference latency: base, unmerged adapters, merged adapter",
           "inference_latency", "the base model, splice's and peft's unmerged LoRA, and the merged "
           "model: a forward and a greedy generate", "merged = base (≤ 1.05 × base time, logits "
           "equal to the unmerged adapter's)", inference),
    Figure("mixed_batch", "Mixed-adapter batches at 1/4/16 adapters vs peft", "mixed_batch",
           "splice's routed mixed batch vs one adapter vs peft's mixed batch (adapter_names)",
           "at 16 adapters: throughput ≥ 0.85 × one adapter's and ≥ 3 × peft's; "
           "switching < 1 ms",
           mixed_batch),
    Figure("adapter_io", "Adapter save / load / hot-swap / switch latency", "adapter_io",
           "splice vs peft on a resident model holding 8 adapters",
           "switch < 1 ms; save, load, hot-swap at parity with peft (the issue names no number)",
           adapter_io),
    Figure("serve_load", "Server throughput at 1/8/32 adapters", "serve_load",
           "splice's HTTP server, concurrent clients over 1, 8 and 32 adapters",
           "32 adapters ≥ 0.8 × the throughput of 1", serve_load),
    Figure("loss_memory", "Fused chunked loss vs full logits", "loss_memory",
           "splice's chunked linear cross-entropy vs the full (B, T, V) logits loss on SmolLM2's "
           "head", "none set: tracked", loss_memory),
    Figure("optimizer_curves", "Optimizers: AdamW, paged, 8-bit (splice and bitsandbytes)",
           "optimizer_curves", "loss curves, state bytes and step time of each optimizer on one "
           "LoRA run", "none set: tracked", optimizer_curves, chart="optimizer_curves"),
    Figure("library_load", "Library load into a resident model", "library_load",
           "AdapterLibrary.load_into vs splice.load_adapter of the same folder",
           "none set: tracked", library_load),
)

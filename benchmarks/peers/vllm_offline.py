"""vLLM's offline engine on benchmark workloads, run inside the vLLM environment (stdlib, vllm, benchmarks.meters).

    .venv-peers/vllm/bin/python benchmarks/peers/vllm_offline.py SPEC.json RESULT.json

SPEC (written by benchmarks/vs_vllm.py): the model directory, dtype, rows (`max_num_seqs`), the CPU KV-space
fraction (`gpu_memory_utilization`) and, per workload, the warm-up and the measured requests (token-id
prompts, exact output lengths, arrival times). Each request gets its own `SamplingParams(temperature=0, max_tokens=n,
ignore_eos=True)`. The engine is driven the way `LLM.generate` drives it (add the requests, then
`llm_engine.step()` until none is unfinished), except that a request is added once its arrival time has
passed and each step's end is timestamped, exactly as benchmarks/systems.py drives our engine. RESULT: start-up
seconds (construction, compile included, once for all workloads) and per workload the measured wall time,
the CPU other processes used meanwhile, and every request's tokens and times.

vLLM starts worker processes, so everything runs under the `__main__` guard.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.meters


def build(spec: dict[str, Any]) -> Any:
    """The `LLM` for the spec (compiles on construction: about a minute on 2 cores)."""
    from vllm import LLM

    return LLM(model=spec["model"], tokenizer=spec["model"], dtype=spec["dtype"], max_num_seqs=spec["rows"],
               gpu_memory_utilization=spec["kv_fraction"], max_model_len=spec["max_model_len"], seed=0)


def params(max_tokens: int) -> Any:
    """Greedy, exactly `max_tokens` new tokens, outputs delivered as deltas after every step."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


def drive(llm: Any, requests: list[dict[str, Any]], log_every_s: float = 10.0) -> dict[str, Any]:
    """Run `requests`; returns the wall time from t=0 to the last output and each request's record."""
    engine = llm.llm_engine
    pending = deque(sorted(requests, key=lambda r: r["arrival_s"]))
    records = {r["id"]: {"arrival_s": r["arrival_s"], "first_token_s": None, "finish_s": None, "tokens": []}
               for r in requests}
    total = sum(r["max_tokens"] for r in requests)
    done_tokens, steps, last_log = 0, 0, 0.0
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and pending[0]["arrival_s"] <= now:
            r = pending.popleft()
            engine.add_request(r["id"], {"prompt_token_ids": r["prompt"]}, params(r["max_tokens"]))
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, pending[0]["arrival_s"] - (time.perf_counter() - t0)))
            continue
        outputs = engine.step()
        t = time.perf_counter() - t0
        steps += 1
        for out in outputs:
            rec = records[out.request_id]
            new = list(out.outputs[0].token_ids) if out.outputs else []
            if new and rec["first_token_s"] is None:
                rec["first_token_s"] = t
            rec["tokens"].extend(new)
            done_tokens += len(new)
            if out.finished:
                rec["finish_s"] = t
        if t - last_log >= log_every_s:
            last_log = t
            print(f"[vllm] {done_tokens}/{total} tokens after {t:.0f} s", file=sys.stderr, flush=True)
    return {"wall_s": time.perf_counter() - t0, "steps": steps, "records": records}


def measure(llm: Any, workload: dict[str, Any]) -> dict[str, Any]:
    """Warm up on the workload's warm-up requests, then run and meter its measured requests."""
    from benchmarks.meters import CpuMeter

    drive(llm, workload["warmup"])
    print(f"[vllm] {workload['name']}: {len(workload['requests'])} requests", file=sys.stderr, flush=True)
    with CpuMeter(tree=True) as cpu:  # this process and vLLM's engine-core process
        result = drive(llm, workload["requests"])
    result.update(own_cpu_cores=cpu.own_cores, other_cpu_cores=cpu.others_cores)
    print(f"[vllm] {workload['name']}: wall {result['wall_s']:.1f} s, other CPU {cpu.others_cores:.2f} cores",
          file=sys.stderr, flush=True)
    return result


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    import vllm

    print(f"[vllm] building LLM (vllm {vllm.__version__}, {spec['dtype']}, max_num_seqs={spec['rows']}); "
          "it compiles for about a minute", file=sys.stderr, flush=True)
    start = time.perf_counter()
    llm = build(spec)
    startup_s = time.perf_counter() - start
    print(f"[vllm] ready after {startup_s:.0f} s", file=sys.stderr, flush=True)
    result = {"startup_s": startup_s, "vllm_version": vllm.__version__,
              "workloads": {w["name"]: measure(llm, w) for w in spec["workloads"]}}
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

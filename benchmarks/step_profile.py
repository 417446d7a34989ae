"""Where a decode step's time goes, by batch size: the profile behind the engine's CPU speed work.

For each batch size, an engine (policy `baton`) holds that many rows at a cache width of about `--context`
columns and runs decode steps; the median step time is measured with each kernel for the decode batch's
linears (engine/narrow_linear.py): plain `F.linear`, `transposed` ((W @ x.T).T) and `compiled` (the C++
kernels, where they build), each through transformers' eager forward, and `captured` (the compiled kernels inside
the captured decode step, engine/captured.py, where it applies), interleaved so machine noise lands on all. A
torch-profiler pass at the largest batch splits one step into the layers' linears, the LM head, attention and
everything else.

    .venv/bin/python -m benchmarks.step_profile            # default model, float32, 2 threads (~3 min)
    .venv/bin/python -m benchmarks.step_profile --dtype bfloat16
    .venv/bin/python -m benchmarks.step_profile --smoke    # tiny random Llama, seconds (CI)

Writes step_profile.json and step_profile.md (the tables) to --out (default benchmarks/results; a temporary
folder for --smoke).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from benchmarks.models import TINY, load
from configs import EngineConfig
from engine import BatonEngine, SamplingParams, cpu_kernel
from engine.model_loader import LoadedModel

RESULTS = Path(__file__).resolve().parent / "results"


# linear: the narrow-linear switch off, plain F.linear; captured: compiled, in the captured decode step
KERNELS = ("linear", "transposed", "compiled", "captured")


def decode_engine(loaded: LoadedModel, rows: int, context: int, kernel: str, seed: int) -> BatonEngine:
    """An engine whose batch holds `rows` rows of `context` prompt tokens, every row already decoding."""
    narrow: dict[str, Any] = dict(narrow_linear=False) if kernel == "linear" else dict(
        narrow_kernel="compiled" if kernel == "captured" else kernel)
    engine = BatonEngine(EngineConfig(model=loaded.name, policy="baton", max_batch_size=rows,
                                      prefill_token_budget=rows * context, captured_forward=kernel == "captured",
                                      **narrow), loaded=loaded)
    rng = random.Random(seed)
    vocab = int(loaded.model.config.vocab_size)
    for i in range(rows):
        engine.add_request(f"r{i}", prompt_token_ids=[rng.randrange(min(100, vocab // 4), vocab)
                                                      for _ in range(context)],
                           sampling_params=SamplingParams(max_tokens=engine.max_model_len - context, ignore_eos=True))
    while engine.stats.running < rows or engine.stats.waiting or engine.stats.prefilled:
        engine.step()
    engine.step()  # one plain decode step before timing
    return engine


def median_step_ms(engine: BatonEngine, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _breakdown(engine: BatonEngine, steps: int) -> dict[str, float]:
    """Milliseconds per step by kind of work (torch profiler, self CPU time)."""
    vocab = int(engine.runner.model.config.vocab_size)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            engine.step()
    kinds = {"layer linears": 0.0, "LM head": 0.0, "attention": 0.0, "other": 0.0}
    for ev in prof.key_averages(group_by_input_shape=True):
        ms = ev.self_cpu_time_total / 1e3 / steps
        shapes = str(ev.input_shapes)
        linear = ev.key in ("aten::mm", "aten::addmm", "aten::bmm") or ev.key.endswith("::skinny_linear")
        if linear and str(vocab) in shapes:
            kinds["LM head"] += ms
        elif linear:
            kinds["layer linears"] += ms
        elif "attention" in ev.key:
            kinds["attention"] += ms
        else:
            kinds["other"] += ms
    return kinds


def run(model: str, batch_sizes: list[int], context: int, steps: int, repeats: int, threads: int,
        seed: int, dtype: str = "float32") -> dict[str, Any]:
    torch.set_num_threads(threads)
    loaded = load(model, dtype=dtype)
    kernels = list(KERNELS) if cpu_kernel.skinny_linear() is not None else ["linear", "transposed"]
    captured_unavailable = None
    if "captured" in kernels:
        probe = decode_engine(loaded, 1, 4, "captured", seed)
        if probe.runner.captured is None:
            captured_unavailable = "the captured decode step does not apply to this model here (engine log)"
            kernels.remove("captured")
    cells: dict[int, dict[str, list[float]]] = {b: {k: [] for k in kernels} for b in batch_sizes}
    bar = tqdm(total=len(batch_sizes) * repeats * len(kernels), desc="step profile", unit="run", file=sys.stderr)
    for b in batch_sizes:
        engines = {k: decode_engine(loaded, b, context, k, seed) for k in kernels}
        if engines["transposed"].runner.narrow is None:
            raise SystemExit("the narrow-linear kernels do not apply on this device; nothing to compare")
        for _ in range(repeats):
            for name, engine in engines.items():
                cells[b][name].append(median_step_ms(engine, steps))
                bar.update()
    bar.close()
    largest = max(batch_sizes)
    profiled = {name: _breakdown(decode_engine(loaded, largest, context, name, seed), steps) for name in kernels}
    rows = []
    for b in batch_sizes:
        best = {k: min(cells[b][k]) for k in kernels}
        rows.append({"rows": b, **{f"step_ms_{k}": best[k] for k in kernels},
                     **{f"speedup_{k}": best["linear"] / best[k] for k in kernels if k != "linear"},
                     **{f"all_ms_{k}": cells[b][k] for k in kernels}})
    return {
        "meta": {"model": model, "dtype": str(loaded.dtype).removeprefix("torch."), "threads": threads,
                 "context": context, "steps_per_measure": steps, "repeats": repeats,
                 "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M:%S")},
        "kernels": kernels,
        "compiled_unavailable": None if "compiled" in kernels else cpu_kernel.why_not(),
        "captured_unavailable": captured_unavailable,
        "step_times": rows,
        "breakdown_at_rows": largest,
        "breakdown_ms": profiled,
    }


def markdown(r: dict[str, Any]) -> str:
    m = r["meta"]
    lines = [f"# Decode step profile ({m['model']}, {m['dtype']}, {m['threads']} threads, ~{m['context']} "
             f"cached columns)", "",
             f"`python -m benchmarks.step_profile` on {m['when']} (torch {m['torch']}); each cell is the best of "
             f"{m['repeats']} medians over {m['steps_per_measure']} steps, the kernels interleaved. `linear`: "
             "plain F.linear (MKL); `transposed`: (W @ x.T).T; `compiled`: engine/kernels/ (skinny_linear*.cpp), each "
             "through transformers' eager forward; `captured`: the compiled kernels in the captured decode step "
             "(engine/captured.py).", ""]
    kernels = r["kernels"]
    if r["compiled_unavailable"]:
        lines += [f"The compiled kernel did not run here: {r['compiled_unavailable']}", ""]
    if r.get("captured_unavailable"):
        lines += [f"The captured step did not run: {r['captured_unavailable']}", ""]
    fast = [k for k in kernels if k != "linear"]
    lines += ["| rows | " + " | ".join(f"step ms, {k}" for k in kernels) + " | "
              + " | ".join(f"speedup, {k}" for k in fast) + " |",
              "|---:|" + "---:|" * (len(kernels) + len(fast))]
    for row in r["step_times"]:
        lines.append(f"| {row['rows']} | " + " | ".join(f"{row[f'step_ms_{k}']:.1f}" for k in kernels) + " | "
                     + " | ".join(f"{row[f'speedup_{k}']:.2f}x" for k in fast) + " |")
    lines += ["", f"Where one step goes at {r['breakdown_at_rows']} rows (ms, torch profiler self time):", "",
              "| kernel | layer linears | LM head | attention | other |", "|---|---:|---:|---:|---:|"]
    for name, kinds in r["breakdown_ms"].items():
        lines.append(f"| {name} | {kinds['layer linears']:.1f} | {kinds['LM head']:.1f} | {kinds['attention']:.1f} "
                     f"| {kinds['other']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, small sizes: seconds (for CI)")
    p.add_argument("--model", default="default")
    p.add_argument("--rows", default="1,2,4,8,16", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=200, help="prompt tokens per row (cache width)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved measurements per cell")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.rows, a.context, a.steps, a.repeats = TINY, "1,4", 16, 3, 1
    out = a.out or (Path(tempfile.mkdtemp(prefix="step-profile-")) if a.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    result = run(a.model, [int(x) for x in a.rows.split(",")], a.context, a.steps, a.repeats, a.threads, a.seed,
                 a.dtype)
    table = markdown(result)
    (out / "step_profile.json").write_text(json.dumps(result, indent=1))
    (out / "step_profile.md").write_text(table)
    print(table)
    print(f"wrote {out / 'step_profile.json'} and {out / 'step_profile.md'}")
    return result


if __name__ == "__main__":
    main()

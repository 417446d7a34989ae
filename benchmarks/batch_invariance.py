"""Batch invariance: does a request get the same tokens alone as in any batch, and where does it break?

Three checks, per dtype (docs/architecture.md, "Batch invariance"):

* `engine`: requests with varied prompt and output lengths run through one engine together, arriving over
  the first iterations so rows join and leave all the time (greedy, EOS ignored); then each request runs alone
  in an engine of its own. Counts the requests whose tokens are identical, and where the first differs.
* `layers`: one decode step of a target row alone, then beside 1-15 other rows of other lengths (so it is
  left-padded by other amounts). Forward hooks record every module's input and output for the target row;
  the first module whose input or output is not bit-identical is where invariance breaks (e.g. the input of
  `o_proj` is the attention output: attention itself differs).
* `linears`: `F.linear` on the model's weight shapes, each row alone and inside batches of 2-64 rows: the
  row counts at which a row's result changes (MKL/oneDNN choose kernels and blockings by the row count).

`--unaligned` runs `engine` and `layers` once more with the layout before the fix (SDPA over exactly the live
window, no alignment), to show the cause. The shipped engine's attention kernel reads only a row's real columns,
so the layout cannot move its bits; the aligned runs use it where it builds.

    .venv/bin/python -m benchmarks.batch_invariance                       # default model, fp32 + bf16
    .venv/bin/python -m benchmarks.batch_invariance --smoke               # tiny random Llama, seconds

Writes batch_invariance.json and batch_invariance.md to --out (default benchmarks/results; a temporary
folder for --smoke).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.models import TINY, load
from benchmarks.step_profile import decode_engine, median_step_ms
from configs import EngineConfig
from engine import BatonEngine, SamplingParams, kv_cache, model_runner
from engine.model_loader import LoadedModel
from engine.narrow_linear import resolve_kernel

RESULTS = Path(__file__).resolve().parent / "results"
LAYER_ROWS = (2, 4, 8, 16)
LINEAR_ROWS = (*range(2, 34), 48, 64)


_ATTENTION_KERNEL = [True]  # the engines and runners below: the attention kernel (shipped) or SDPA


@contextlib.contextmanager
def unaligned() -> Iterator[None]:
    """The layout before the fix: SDPA (the attention kernel reads only real columns, so the layout cannot move
    its bits) over exactly the live window (no alignment)."""
    saved = kv_cache.attention_width, model_runner.attention_width
    kv_cache.attention_width = model_runner.attention_width = lambda width: width  # type: ignore[assignment]
    _ATTENTION_KERNEL[0] = False
    try:
        yield
    finally:
        kv_cache.attention_width, model_runner.attention_width = saved
        _ATTENTION_KERNEL[0] = True


def workload(vocab: int, n: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int], seed: int
             ) -> list[dict[str, Any]]:
    """`n` requests: random token prompts and output lengths, arriving one every other iteration."""
    rng = random.Random(seed)
    lo = min(100, vocab // 4)
    return [{"id": f"r{i}", "prompt": [rng.randrange(lo, vocab) for _ in range(rng.randint(*prompt_len))],
             "max_tokens": rng.randint(*max_tokens), "arrival": 2 * i} for i in range(n)]


def run_engine(loaded: LoadedModel, requests: list[dict[str, Any]], rows: int) -> dict[str, list[int]]:
    """Every request through one engine, each added at its arrival iteration; tokens per request."""
    engine = BatonEngine(EngineConfig(model=loaded.name, max_batch_size=rows, attention_kernel=_ATTENTION_KERNEL[0]),
                         loaded=loaded)
    pending = sorted(requests, key=lambda r: r["arrival"])
    tokens: dict[str, list[int]] = {r["id"]: [] for r in requests}
    while pending or engine.has_unfinished_requests():
        while pending and pending[0]["arrival"] <= engine.iteration:
            r = pending.pop(0)
            engine.add_request(r["id"], prompt_token_ids=r["prompt"],
                               sampling_params=SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True))
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return tokens


def engine_check(loaded: LoadedModel, requests: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """Tokens of every request in one shared engine against the same engine's run of that request alone."""
    t0 = time.perf_counter()
    together = run_engine(loaded, requests, rows)
    alone = {r["id"]: run_engine(loaded, [{**r, "arrival": 0}], rows)[r["id"]] for r in requests}
    differ = {}
    for rid, ref in alone.items():
        got = together[rid]
        if got != ref:
            differ[rid] = next(i for i, (a, b) in enumerate(zip(got, ref, strict=True)) if a != b)
    return {"requests": len(requests), "identical": len(requests) - len(differ),
            "first_differing_token": differ, "seconds": round(time.perf_counter() - t0, 1)}


def _step_records(loaded: LoadedModel, kvs: list[kv_cache.RowKV], order: list[int]
                  ) -> dict[str, torch.Tensor]:
    """One decode step over rows `order` (the target first); every module's input and output for row 0."""
    runner = model_runner.ModelRunner(loaded.model, loaded.device, attention_kernel=_ATTENTION_KERNEL[0])
    shape = runner.shape
    cache = kv_cache.BatchKVCache(shape.num_layers, shape.kv_heads, shape.head_dim, loaded.dtype, loaded.device,
                                  row_capacity=len(order))
    for i in order:
        cache.insert(f"r{i}", kvs[i])
    names = {m: n for n, m in loaded.model.named_modules()}
    records: dict[str, torch.Tensor] = {}

    def hook(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        for suffix, value in ((".in", args[0] if args else None), ("", out[0] if isinstance(out, tuple) else out)):
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                records.setdefault(names[module] + suffix, value[0].detach().clone())

    handles = [m.register_forward_hook(hook) for m in loaded.model.modules() if m is not loaded.model]
    try:
        n, token = len(order), int(loaded.model.config.vocab_size) // 2
        runner.batch_forward(cache, torch.full((n, 1), token), torch.tensor(cache.real)[:, None],
                             torch.ones(n, 1, dtype=torch.bool))
    finally:
        for h in handles:
            h.remove()
    return records


def layer_check(loaded: LoadedModel, prompt_lens: list[int], seed: int) -> dict[str, Any]:
    """For each target row and batch size: the first module (in call order) whose input or output for the
    target differs bitwise between the row alone and the row in the batch."""
    runner = model_runner.ModelRunner(loaded.model, loaded.device, attention_kernel=_ATTENTION_KERNEL[0])
    rng = random.Random(seed)
    vocab = int(loaded.model.config.vocab_size)
    kvs = [runner.prefill([rng.randrange(min(100, vocab // 4), vocab) for _ in range(n)])[0] for n in prompt_lens]
    first: dict[str, int] = {}
    cases = 0
    for target in range(len(prompt_lens)):
        alone = _step_records(loaded, kvs, [target])
        for rows in LAYER_ROWS:
            others = [i for i in range(len(prompt_lens)) if i != target][: rows - 1]
            batch = _step_records(loaded, kvs, [target, *others])
            cases += 1
            where = next((name for name, value in alone.items() if not torch.equal(value, batch[name])), None)
            if where is not None:
                first[where] = first.get(where, 0) + 1
    return {"cases": cases, "bit_identical": cases - sum(first.values()), "first_difference_at": first}


def linear_check(loaded: LoadedModel, seed: int) -> dict[str, list[int]]:
    """For each distinct weight shape of the model: the batch row counts at which the decode batch's linear
    (the engine's narrow kernel where it applies, else F.linear: engine/narrow_linear.py) gives some row a
    result different from that row alone."""
    _, kernel = resolve_kernel("auto")

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        out = kernel(x, w, None)
        return out if out is not None else torch.nn.functional.linear(x, w)

    gen = torch.Generator().manual_seed(seed)
    shapes = sorted({tuple(m.weight.shape) for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)})
    found = {}
    for out_f, in_f in shapes:
        w = (torch.randn(out_f, in_f, generator=gen) * in_f ** -0.5).to(loaded.dtype)
        x = torch.randn(max(LINEAR_ROWS), in_f, generator=gen).to(loaded.dtype)
        alone = torch.cat([linear(x[r : r + 1], w) for r in range(x.shape[0])])
        found[f"{out_f}x{in_f}"] = [m for m in LINEAR_ROWS if not torch.equal(linear(x[:m], w), alone[:m])]
    return found


def cost_check(loaded: LoadedModel, batch_sizes: list[int], context: int, steps: int, repeats: int,
               seed: int) -> list[dict[str, Any]]:
    """Decode step time with the aligned window against the unaligned one, interleaved so machine noise lands
    on both: for each batch size the best of `repeats` medians over `steps` steps."""
    found = []
    for rows in batch_sizes:
        engines = {"aligned": decode_engine(loaded, rows, context, "auto", seed),
                   "unaligned": decode_engine(loaded, rows, context, "auto", seed)}
        times: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(repeats):
            for layout, engine in engines.items():
                with unaligned() if layout == "unaligned" else contextlib.nullcontext():
                    times[layout].append(median_step_ms(engine, steps))
        best = {k: min(v) for k, v in times.items()}
        found.append({"rows": rows, "columns": engines["aligned"].cache.length, **{f"{k}_ms": v for k, v in best.items()},
                      "ratio": best["aligned"] / best["unaligned"]})
    return found


def table(result: dict[str, Any]) -> str:
    lines = ["| dtype | layout | requests identical to their solo run | decode steps bit-identical | "
             "first difference at |", "|---|---|---|---|---|"]
    for row in result["runs"]:
        e, lay = row["engine"], row["layers"]
        where = ", ".join(f"{k} ({v})" for k, v in lay["first_difference_at"].items()) or "-"
        lines.append(f"| {row['dtype']} | {row['layout']} | {e['identical']}/{e['requests']} | "
                     f"{lay['bit_identical']}/{lay['cases']} | {where} |")
    if result["cost"]:
        lines += ["", "| dtype | rows | columns | step ms, aligned | step ms, unaligned | aligned / unaligned |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {dtype} | {c['rows']} | {c['columns']} | {c['aligned_ms']:.1f} | {c['unaligned_ms']:.1f} | "
                  f"{c['ratio']:.3f} |" for dtype, cells in result["cost"].items() for c in cells]
    lines += ["", "| dtype | weight | row counts where a row's decode linear result changes |", "|---|---|---|"]
    for dtype, shapes in result["linears"].items():
        lines += [f"| {dtype} | {shape} | {rows or '-'} |" for shape, rows in shapes.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48, help="outputs are uniform in [1, this]")
    ap.add_argument("--unaligned", action="store_true", help="also run the layout before the fix")
    ap.add_argument("--cost", default="", help="comma-separated batch sizes: time decode steps aligned vs not")
    ap.add_argument("--only-cost", action="store_true", help="skip the invariance checks")
    ap.add_argument("--context", type=int, default=225,
                    help="--cost: prompt tokens per row (225: the window sits just past a multiple of 32, the most "
                    "columns the alignment adds)")
    ap.add_argument("--steps", type=int, default=8, help="--cost: decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="--cost: interleaved measurements per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny random Llama, few requests (CI)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.dtypes, args.requests, args.max_tokens = TINY, "float32", 6, 8
        args.context, args.steps, args.repeats = 40, 2, 1
    out = args.out or (Path(tempfile.mkdtemp(prefix="batch_invariance_")) if args.smoke else RESULTS)
    result: dict[str, Any] = {"model": args.model, "rows": args.rows, "threads": torch.get_num_threads(),
                              "runs": [], "linears": {}, "cost": {}}
    for dtype in args.dtypes.split(","):
        loaded = load(args.model, dtype=dtype)
        vocab = int(loaded.model.config.vocab_size)
        prompt_len = (4, 32) if args.smoke else (16, 256)
        requests = workload(vocab, args.requests, prompt_len, (1, args.max_tokens), args.seed)
        lens = [len(r["prompt"]) for r in requests]
        if args.cost:
            result["cost"][dtype] = cost_check(loaded, [int(b) for b in args.cost.split(",")], args.context,
                                               args.steps, args.repeats, args.seed)
            print(json.dumps(result["cost"][dtype]), file=sys.stderr)
        if args.only_cost:
            continue
        layouts = (("aligned", contextlib.nullcontext), ("unaligned", unaligned))[: 2 if args.unaligned else 1]
        for layout, ctx in layouts:
            with ctx():
                run = {"dtype": dtype, "layout": layout, "engine": engine_check(loaded, requests, args.rows),
                       "layers": layer_check(loaded, lens, args.seed)}
            print(json.dumps(run), file=sys.stderr)
            result["runs"].append(run)
        result["linears"][dtype] = linear_check(loaded, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_invariance.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "batch_invariance.md").write_text(table(result))
    print(table(result))
    print(f"wrote {out}/batch_invariance.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU decode-step benchmark: step time vs the memory-bandwidth floor, and baton-pd vs static.

    python -m benchmarks.gpu_decode [--shapes 1b,8b] [--rows 1,2,4,8,16,32,64] [--kv 512] [--out DIR]

Randomly initialised Llama models built from a config (no download), bfloat16, on one CUDA device:
* **8b**: Llama-3-8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, MLP 14336);
* **1b**: Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP 8192).
The vocabulary is the default tokenizer's (49152, not Llama-3's 128256) so outputs detokenise; the text is
noise, the timing is what matters. Decode at `rows` rows with a KV cache of `--kv` tokens per row is timed
against the floor `(weight bytes + cache bytes) / measured bandwidth`, where the bandwidth is a large
device-to-device copy measured in the same run. Then the anyscale workload (prompts 16-256, outputs
exponential mean 64 capped at 256, EOS ignored) runs under `static` and `baton-pd` at 64 rows.

Without a CUDA device it says so and exits 0 (`--smoke` runs the same code on CPU with a toy shape, so CI
keeps it from rotting). Writes gpu_decode.json and gpu_decode.png, naming the device.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "toy": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.model_loader import LoadedModel, load_model

    tok = load_model("default", dtype="float32", device="cpu").tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, tie_word_embeddings=False,
                      **SHAPES[shape])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight in the target dtype (8B in fp32 would be 32 GB)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tok, dtype=dtype, device=device, name=f"random-{shape}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0, n = time.perf_counter(), 10
    for _ in range(n):
        dst.copy_(src)
    sync(device)
    return 2 * src.nbytes * n / (time.perf_counter() - t0)


def decode_step_times(loaded: Any, rows_list: list[int], kv: int, steps: int) -> list[dict[str, float]]:
    from engine.kv_cache import BatchKVCache, RowKV
    from engine.model_runner import ModelRunner

    runner = ModelRunner(loaded.model, loaded.device)
    sh = runner.shape
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    out = []
    for rows in rows_list:
        cache = BatchKVCache(sh.num_layers, sh.kv_heads, sh.head_dim, loaded.dtype, loaded.device, rows,
                             col_capacity=kv + steps + 64)
        shape = (sh.num_layers, sh.kv_heads, kv, sh.head_dim)
        for r in range(rows):
            cache.insert(f"r{r}", RowKV(torch.randn(shape, dtype=loaded.dtype, device=loaded.device),
                                        torch.randn(shape, dtype=loaded.dtype, device=loaded.device)))
        ids = torch.randint(100, int(loaded.model.config.vocab_size), (rows, 1), device=loaded.device)
        real = torch.ones(rows, 1, dtype=torch.bool, device=loaded.device)
        times = []
        for i in range(steps):
            pos = torch.tensor(cache.real, device=loaded.device)[:, None]
            sync(loaded.device)
            t0 = time.perf_counter()
            runner.batch_forward(cache, ids, pos, real)
            sync(loaded.device)
            if i >= 2:  # warm-up
                times.append(time.perf_counter() - t0)
        times.sort()
        out.append({"rows": rows, "kv": kv, "step_ms": 1000 * times[len(times) // 2],
                    "weight_bytes": weight_bytes, "cache_bytes": rows * (kv + steps) * cache.bytes_per_token})
        del cache
    return out


def anyscale(loaded: Any, n: int, rows: int, seed: int = 0) -> dict[str, dict[str, float]]:
    from configs import EngineConfig
    from engine import BatonEngine, SamplingParams

    rng = random.Random(seed)
    vocab = loaded.model.config.vocab_size
    work = [([rng.randrange(100, vocab) for _ in range(rng.randint(16, 256))],
             min(256, max(1, int(rng.expovariate(1 / 64))))) for _ in range(n)]
    result = {}
    for policy in ("static", "baton-pd"):
        engine = BatonEngine(EngineConfig(policy=policy, max_batch_size=rows, dtype="bfloat16"), loaded=loaded)
        for i, (prompt, m) in enumerate(work):
            engine.add_request(f"q{i}", prompt_token_ids=prompt,
                               sampling_params=SamplingParams(max_tokens=m, ignore_eos=True))
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        sync(loaded.device)
        wall = time.perf_counter() - t0
        useful = sum(m for _, m in work)
        result[policy] = {"wall_s": wall, "useful_tokens_per_s": useful / wall,
                          "idle_fraction": engine.stats.idle_fraction,
                          "outside_forward_fraction": engine.stats.outside_forward_fraction}
    result["baton-pd_vs_static"] = {"ratio": result["baton-pd"]["useful_tokens_per_s"]
                                    / result["static"]["useful_tokens_per_s"]}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--kv", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--smoke", action="store_true", help="toy shape on CPU, seconds (for CI)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    if args.smoke:
        device, dtype, shapes = torch.device("cpu"), torch.float32, ["toy"]
        rows_list, kv, steps, n_req, any_rows = [1, 4], 32, 4, 6, 4
    elif not torch.cuda.is_available():
        print("gpu_decode: no CUDA device here; nothing to measure (use --smoke to exercise the code on CPU)")
        return 0
    else:
        device, dtype, shapes = torch.device("cuda"), torch.bfloat16, args.shapes.split(",")
        rows_list, kv, steps, n_req, any_rows = ([int(r) for r in args.rows.split(",")], args.kv, args.steps,
                                                 args.requests, 64)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"
    bandwidth = measured_bandwidth(device, 1 << (31 if device.type == "cuda" else 24))
    print(f"device: {name}; measured copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    report: dict[str, Any] = {"device": name, "dtype": str(dtype), "bandwidth_bytes_per_s": bandwidth,
                              "shapes": {}}
    for shape in shapes:
        loaded = build_model(shape, device, dtype)
        sweep = decode_step_times(loaded, rows_list, kv, steps)
        print(f"\n{shape}: | rows | step ms | floor ms | floor / step |\n|---|---|---|---|")
        for row in sweep:
            row["floor_ms"] = 1000 * (row["weight_bytes"] + row["cache_bytes"]) / bandwidth
            row["floor_over_step"] = row["floor_ms"] / row["step_ms"]
            print(f"| {row['rows']} | {row['step_ms']:.2f} | {row['floor_ms']:.2f} | {row['floor_over_step']:.0%} |")
        comparison = anyscale(loaded, n_req, any_rows)
        print(f"anyscale ({n_req} requests, {any_rows} rows): baton-pd / static = "
              f"{comparison['baton-pd_vs_static']['ratio']:.2f}x")
        report["shapes"][shape] = {"decode": sweep, "anyscale": comparison}
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_decode.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "gpu_decode.png")
    print(f"\nwrote {out / 'gpu_decode.json'} and {out / 'gpu_decode.png'}")
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for shape, data in report["shapes"].items():
        rows = [d["rows"] for d in data["decode"]]
        ax.plot(rows, [d["step_ms"] for d in data["decode"]], "o-", label=f"{shape} step")
        ax.plot(rows, [d["floor_ms"] for d in data["decode"]], "--", label=f"{shape} bandwidth floor")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows")
    ax.set_ylabel("decode step (ms)")
    ax.set_title(f"Decode step vs memory-bandwidth floor — {report['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

"""HTTP load: the BATON deployment vs a plain `@serve.batch` + `generate` deployment, over loopback HTTP.

    .venv/bin/python -m benchmarks.http_load            # default model, 32 anyscale requests, 16 in flight
    .venv/bin/python -m benchmarks.http_load --smoke    # tiny random Llama, 6 requests, 3 in flight (seconds)

Both systems are real Ray Serve applications of the same model, deployed one after the other on one Serve
instance (127.0.0.1, a free port) and driven by the same closed-loop client (httpx, bounded concurrency) with
the same seeded requests: (a) `deployments.builder.make_app` (policy baton-pd, one replica, no autoscaling) and
(b) `benchmarks.plain_serve` (FastAPI ingress, `@serve.batch`, `model.generate` on a left-padded batch).
Writes http_load.md, http_load.json and http_load.png into --out (default benchmarks/results; a temporary
folder for --smoke). See benchmarks/README.md ("HTTP load") for the fairness rules, also printed in the output.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks import plots
from benchmarks.capped import run_capped
from benchmarks.compare import _f, _pct, provenance
from benchmarks.meters import CpuMeter
from benchmarks.plain_serve import DEFAULT_BATCH_WAIT_S
from benchmarks.serve_local import serve_instance
from benchmarks.workloads import FULL_LENGTHS, SMOKE_LENGTHS, BenchRequest, LengthSpec, Workload, anyscale

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ("baton", "plain")  # the order they run in
LABELS = {"baton": "BATON (baton-pd)", "plain": "@serve.batch + generate"}
APP_NAMES = {"baton": "http-load-baton", "plain": "http-load-plain"}
WARMUP_REQUESTS = 2


@dataclass(frozen=True)
class Plan:
    model: str  # "default", anything engine.model_loader loads, or "tiny" (benchmarks.models.tiny_llama)
    lengths: LengthSpec
    requests: int
    concurrency: int  # requests in flight at once (closed loop)
    max_batch_size: int  # BATON rows = @serve.batch max_batch_size
    threads: int  # torch intra-op threads inside each replica
    seed: int
    cap_s: float  # wall-clock cap per system for the measured phase; unfinished requests count as failed
    batch_wait_timeout_s: float  # @serve.batch's wait for a fuller batch
    stream_pass: bool  # BATON only: a second, streaming pass over the same requests for time to first token


FULL = Plan(model="default", lengths=FULL_LENGTHS, requests=32, concurrency=16, max_batch_size=16, threads=2,
            seed=0, cap_s=600.0, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S, stream_pass=True)
# Tiny lengths; 1 torch thread keeps the tiny model's small ops robust on a busy 2-core box (as compare's smoke).
SMOKE = Plan(model="tiny", lengths=SMOKE_LENGTHS, requests=6, concurrency=3, max_batch_size=16, threads=1,
             seed=0, cap_s=60.0, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S, stream_pass=True)


def fairness(plan: Plan) -> list[str]:
    return [
        f"Same model ({plan.model}), dtype float32, CPU and torch.set_num_threads({plan.threads}) inside both "
        f"replicas (BATON: EngineConfig.num_threads; plain: in __init__), one replica each with "
        f"ray_actor_options num_cpus={plan.threads}, no autoscaling.",
        "The two applications run one after the other on one Serve instance (the first is deleted before the "
        "second is deployed), never both at once.",
        f"Same requests, same client: {plan.requests} seeded anyscale-style requests (prompts of random token "
        "ids sent as token-id lists to POST /v1/completions), greedy (temperature 0), non-streaming, through "
        f"the Serve proxy on 127.0.0.1, at most {plan.concurrency} in flight (closed loop: the next request "
        "is sent when one returns), in the same order.",
        "Exact lengths: BATON gets ignore_eos=true and max_tokens=n; the plain deployment's @serve.batch "
        f"(max_batch_size={plan.max_batch_size}, batch_wait_timeout_s={plan.batch_wait_timeout_s:g}) runs "
        "model.generate on the left-padded batch with max_new_tokens = min_new_tokens = the batch's largest "
        "max_tokens (EOS suppressed) and truncates each row to its own n. Every response's "
        "usage.completion_tokens is checked against n ('exact').",
        f"Same batch width: {plan.max_batch_size} BATON rows (policy baton-pd, fixed capacity controller), "
        f"@serve.batch max_batch_size {plan.max_batch_size}. Both deployments accept every request in "
        "flight (max_ongoing_requests and BATON's server.max_pending_requests above the concurrency).",
        f"Each system first serves a {WARMUP_REQUESTS}-request warm-up (16-token prompts, up to 4 tokens out) "
        "that is not measured.",
        "Useful tok/s = the completion tokens returned (usage.completion_tokens) over the wall time of the "
        f"measured phase (first request sent to last response received, or the {plan.cap_s:g} s cap); "
        "requests not answered by the cap count as failed. Latency is measured by the client: end to end "
        "(request sent to whole response received) and per output token (end to end / completion tokens).",
        "The client runs in the benchmark's own process on the same machine as the replica (the same for "
        "both systems). Other jobs may share the machine: 'other CPU' is the CPU time used during the measured "
        "phase by processes outside the benchmark's process tree (the tree holds the client and, when the "
        "benchmark started Ray, every Ray process and replica), in cores. Near 0 means clean numbers; with "
        "2 torch threads on 2 cores even 0.3 slows the replica badly (each parallel region waits for its "
        "descheduled thread), so compare the systems only when both rows show little.",
    ]


# ---- the two applications ----------------------------------------------------------------------------------------
def deployment_limit(plan: Plan) -> int:
    """max_ongoing_requests / max_pending_requests / max_queued_requests: well above the client's concurrency."""
    return max(64, 4 * plan.concurrency)


def build_app(system: str, plan: Plan) -> Any:
    """The Serve application of `system` (imports Serve and the deployments lazily)."""
    limit = deployment_limit(plan)
    options: dict[str, Any] = {"num_replicas": 1, "max_ongoing_requests": limit, "max_queued_requests": limit,
                               "ray_actor_options": {"num_cpus": plan.threads}}
    if system == "baton":
        from configs import EngineConfig
        from configs.serve import ServerConfig
        from deployments.builder import make_app

        engine = EngineConfig(model=plan.model, dtype="float32", device="cpu", policy="baton-pd",
                              max_batch_size=plan.max_batch_size, num_threads=plan.threads,
                              max_model_len=512 if plan.model == "tiny" else None)
        front = None
        if plan.model == "tiny":
            from benchmarks.models import tiny_engine_front

            front = tiny_engine_front
        ingress = {"max_ongoing_requests": limit + 8, "max_queued_requests": limit}
        return make_app(engine, ServerConfig(max_pending_requests=limit), front, engine_options=options,
                        ingress_options=ingress)
    if system == "plain":
        from benchmarks.plain_serve import PlainGenerateServer

        deployment = PlainGenerateServer.options(**options)  # type: ignore[attr-defined]
        return deployment.bind(plan.model, "float32", plan.threads, plan.max_batch_size,
                               plan.batch_wait_timeout_s)
    raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")


# ---- the client --------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What the client saw for one request."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    ok: bool = False
    completion_tokens: int | None = None
    e2e_s: float | None = None
    ttft_s: float | None = None  # streaming pass only: first chunk with text
    error: str | None = None

    @property
    def exact(self) -> bool:
        return self.ok and self.completion_tokens == self.max_tokens


def request_body(r: BenchRequest, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": r.prompt, "max_tokens": r.max_tokens, "temperature": 0.0,
                            "ignore_eos": True}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def _unary(client: httpx.AsyncClient, path: str, r: BenchRequest, o: Outcome, start: float) -> None:
    resp = await client.post(path, json=request_body(r, stream=False))
    if resp.status_code != 200:
        o.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
        return
    usage = resp.json().get("usage") or {}
    o.e2e_s = time.perf_counter() - start
    o.completion_tokens = usage.get("completion_tokens")
    o.ok = o.completion_tokens is not None
    if not o.ok:
        o.error = "response without usage.completion_tokens"


async def _streamed(client: httpx.AsyncClient, path: str, r: BenchRequest, o: Outcome, start: float) -> None:
    async with client.stream("POST", path, json=request_body(r, stream=True)) as resp:
        if resp.status_code != 200:
            o.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                o.error = f"stream error: {chunk['error']}"
                return
            choices = chunk.get("choices") or []
            if o.ttft_s is None and choices and choices[0].get("text"):
                o.ttft_s = time.perf_counter() - start
            if chunk.get("usage"):
                o.completion_tokens = chunk["usage"]["completion_tokens"]
    o.e2e_s = time.perf_counter() - start
    o.ok = o.completion_tokens is not None
    if not o.ok:
        o.error = "stream without a usage chunk"


async def drive(base_url: str, path: str, requests: tuple[BenchRequest, ...], concurrency: int, cap_s: float,
                stream: bool = False, progress: Callable[[int], None] = lambda n: None
                ) -> tuple[list[Outcome], float]:
    """Send every request (at most `concurrency` in flight, in order); returns the outcomes and the wall time
    from the first send to the last response (or `cap_s`, when some were still running: they failed)."""
    outcomes = [Outcome(r.request_id, len(r.prompt), r.max_tokens) for r in requests]
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(cap_s + 60), limits=limits,
                                 trust_env=False) as client:  # trust_env: never through an HTTP(S)_PROXY

        async def one(r: BenchRequest, o: Outcome) -> None:
            async with gate:
                start = time.perf_counter()
                try:
                    await (_streamed if stream else _unary)(client, path, r, o, start)
                except asyncio.CancelledError:
                    o.error = f"not answered within the {cap_s:g} s cap"
                    raise
                except (httpx.HTTPError, json.JSONDecodeError) as e:
                    o.error = f"{type(e).__name__}: {e}"
                progress(o.completion_tokens or 0)

        t0 = time.perf_counter()
        wall = await run_capped((one(r, o) for r, o in zip(requests, outcomes, strict=True)), cap_s, t0)
    for o in outcomes:  # cancelled before it was sent (still waiting for a slot)
        if not o.ok and o.error is None:
            o.error = f"not answered within the {cap_s:g} s cap"
    return outcomes, wall


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Poll GET `url` until 200 (the proxy learns a new route a moment after `serve.run` returns)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=10, trust_env=False)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout_s:g} s (last: {last})")


# ---- metrics -----------------------------------------------------------------------------------------------------
def _dist(values: list[float], quantiles: tuple[int, ...]) -> dict[str, float | None]:
    return {f"p{q}": _pct(values, q) for q in quantiles}


def summarize(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    done = [o for o in outcomes if o.ok]
    tokens = sum(o.completion_tokens or 0 for o in done)
    e2e = [o.e2e_s for o in done if o.e2e_s is not None]
    per_token = [o.e2e_s / o.completion_tokens for o in done if o.e2e_s is not None and o.completion_tokens]
    ttft = [o.ttft_s for o in done if o.ttft_s is not None]
    return {
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "inexact": [{"request_id": o.request_id, "max_tokens": o.max_tokens, "completion_tokens": o.completion_tokens}
                    for o in done if not o.exact],
        "errors": sorted({o.error for o in outcomes if o.error}),
        "useful_tokens": tokens,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "latency": {"e2e_s": _dist(e2e, (50, 90, 99)), "per_token_s": _dist(per_token, (50, 99)),
                    "ttft_s": _dist(ttft, (50, 90, 99)) if ttft else None},
        "requests": [asdict(o) for o in outcomes],
    }


# ---- one system --------------------------------------------------------------------------------------------------
def warmup_requests(work: Workload) -> tuple[BenchRequest, ...]:
    """Two short requests (16-token prompts, at most 4 tokens out) from the workload: first-call costs."""
    return tuple(BenchRequest(f"warm{i}", r.prompt[:16], min(4, r.max_tokens))
                 for i, r in enumerate(work.requests[:WARMUP_REQUESTS]))


def _replica_info(system: str, url: str) -> dict[str, Any]:
    """What the replica reports about itself: threads and dtype (plain: /info), the engine config (BATON)."""
    try:
        r = httpx.get(f"{url}/info" if system == "plain" else f"{url}/stats", timeout=30, trust_env=False)
        data: dict[str, Any] = r.json()
    except (httpx.HTTPError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if system == "plain":
        return data
    config = data.get("config") or {}
    return {"model": data.get("model"), "dtype": config.get("dtype"), "num_threads": config.get("num_threads"),
            "policy": config.get("policy"), "max_batch_size": config.get("max_batch_size")}


def _progress_bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False, dynamic_ncols=True)


def run_system(system: str, plan: Plan, base_url: str, work: Workload) -> dict[str, Any]:
    """Deploy `system`, warm it up, measure it (and for BATON, the streaming pass), delete it."""
    from ray import serve

    name = APP_NAMES[system]
    prefix = f"/{name}"
    url = f"{base_url}{prefix}"
    t_deploy = time.perf_counter()
    try:
        serve.run(build_app(system, plan), name=name, route_prefix=prefix)
        wait_ready(f"{url}/health")
        deploy_s = time.perf_counter() - t_deploy
        warm, _ = asyncio.run(drive(base_url, f"{prefix}/v1/completions", warmup_requests(work),
                                    WARMUP_REQUESTS, plan.cap_s))
        bad = [o for o in warm if not o.exact]
        if bad:
            raise RuntimeError(f"{system}: the warm-up failed: {[asdict(o) for o in bad]}")
        before = _replica_info(system, url)
        load_before = os.getloadavg()[0]
        with _progress_bar(work.useful_tokens, f"{system:>5} | measured") as bar, CpuMeter(tree=True) as cpu:
            outcomes, wall = asyncio.run(drive(base_url, f"{prefix}/v1/completions", work.requests,
                                               plan.concurrency, plan.cap_s, progress=bar.update))
        result = summarize(outcomes, wall)
        replica = _replica_info(system, url)
        if "batch_sizes" in replica:  # the plain replica's batches during the measured phase (warm-up left out)
            replica["batch_sizes"] = replica["batch_sizes"][len(before.get("batch_sizes", [])):]
        result.update(label=LABELS[system], deploy_s=deploy_s, load_average_1min=[load_before, os.getloadavg()[0]],
                      own_cpu_cores=cpu.own_cores, other_cpu_cores=cpu.others_cores, replica=replica)
        tqdm.write(f"{system:>5} | {result['completed']}/{len(outcomes)} completed, "
                   f"{result['tokens_per_s']:.1f} tok/s, wall {wall:.1f} s, other CPU {cpu.others_cores:.2f} cores",
                   file=sys.stderr)
        if system == "baton" and plan.stream_pass:
            with _progress_bar(work.useful_tokens, f"{system:>5} | streaming") as bar, CpuMeter(tree=True) as cpu:
                s_out, s_wall = asyncio.run(drive(base_url, f"{prefix}/v1/completions", work.requests,
                                                  plan.concurrency, plan.cap_s, stream=True,
                                                  progress=bar.update))
            result["streaming"] = {**summarize(s_out, s_wall), "other_cpu_cores": cpu.others_cores}
        return result
    finally:
        serve.delete(name)


# ---- report ------------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    made = provenance(m, f"ray {m['ray']}")
    lines = [
        f"# HTTP load: BATON deployment vs @serve.batch + generate ({'smoke, ' if m['smoke'] else ''}"
        f"{m['model']}, {m['dtype']}, {m['threads']} torch threads, {m['max_batch_size']} rows)",
        "",
        f"{made}. Loopback HTTP through the Ray Serve proxy; "
        f"{m['requests']} requests, at most {m['concurrency']} in flight, cap {m['cap_s']:g} s per system.",
        f"Workload: {m['workload']['description']}; {m['workload']['summary']['output_tokens']['total']} "
        "output tokens in all.",
        "",
        "| system | completed | failed | exact | useful tok/s | vs plain | E2E p50 s | E2E p90 s | E2E p99 s "
        "| per-token p50 ms | per-token p99 ms | wall s | other CPU |",
        "|---|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["systems"].values():
        e2e, pt = r["latency"]["e2e_s"], r["latency"]["per_token_s"]
        ratio = r.get("ratio_vs_plain")
        exact = "yes" if not r["inexact"] and not r["failed"] else f"NO ({len(r['inexact'])} inexact)"
        lines.append(
            f"| {r['label']} | {r['completed']} | {r['failed']} | {exact} | {r['tokens_per_s']:.1f} "
            f"| {_f(ratio, '.2f')}{'x' if ratio is not None else ''} | {_f(e2e['p50'], '.2f')} "
            f"| {_f(e2e['p90'], '.2f')} | {_f(e2e['p99'], '.2f')} | {_f(pt['p50'], '.0f', 1e3)} "
            f"| {_f(pt['p99'], '.0f', 1e3)} | {r['wall_s']:.1f} | {r['other_cpu_cores']:.2f} |")
    lines.append("")
    if report.get("ratio_baton_over_plain") is not None:
        lines += [f"Throughput ratio BATON / plain: **{report['ratio_baton_over_plain']:.2f}x**.", ""]
    for r in report["systems"].values():
        if r["inexact"]:
            lines.append(f"- **{r['label']}: {len(r['inexact'])} responses without exactly max_tokens tokens**: "
                         + ", ".join(f"{x['request_id']} ({x['completion_tokens']}/{x['max_tokens']})"
                                     for x in r["inexact"]))
        if r["errors"]:
            lines.append(f"- **{r['label']}: {r['failed']} failed**: " + "; ".join(r["errors"][:5]))
    baton = report["systems"].get("baton")
    streaming = baton.get("streaming") if baton else None
    if streaming:
        t = streaming["latency"]["ttft_s"] or {}
        lines += [
            "",
            "Time to first token (BATON only, a second pass over the same requests with `stream: true`; "
            "first SSE chunk carrying text, measured by the client): "
            f"p50 {_f(t.get('p50'), '.2f')} s, p90 {_f(t.get('p90'), '.2f')} s, p99 {_f(t.get('p99'), '.2f')} s "
            f"({streaming['completed']}/{streaming['completed'] + streaming['failed']} completed, "
            f"{'all exact' if not streaming['inexact'] and not streaming['failed'] else 'NOT all exact'}, "
            f"{streaming['tokens_per_s']:.1f} tok/s streamed). The plain deployment cannot stream "
            "(generate returns the whole batch at once), so it has no TTFT row.",
        ]
    elif baton is not None:
        lines += ["", "Time to first token: not measured (run without --no-stream-pass for BATON's TTFT)."]
    lines += ["", "Replicas reported:", ""]
    for r in report["systems"].values():
        info = r["replica"]
        if "batch_sizes" in info:
            info = {**info, "batch_sizes": f"(measured phase) {info['batch_sizes']}"}
        lines.append(f"- {r['label']}: " + ", ".join(f"{k} {v}" for k, v in info.items())
                     + f"; deployed and ready in {r['deploy_s']:.1f} s; 1-min load average "
                     f"{r['load_average_1min'][0]:.2f} before the measured phase, {r['load_average_1min'][1]:.2f} "
                     "after")
    lines += ["", "## Fairness", ""] + [f"- {f}" for f in m["fairness"]] + [""]
    return "\n".join(lines)


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "http_load.md").write_text(markdown(report))
    (out / "http_load.json").write_text(json.dumps(report, indent=1))
    plots.http_load(report, out / "http_load.png")


# ---- running -----------------------------------------------------------------------------------------------------
def make_workload(plan: Plan) -> tuple[Workload, dict[str, Any]]:
    """The seeded anyscale-style requests for the model's vocabulary (the model is loaded here only to read it)."""
    from benchmarks.models import load

    loaded = load(plan.model)
    vocab = int(loaded.model.get_input_embeddings().num_embeddings)
    del loaded
    gc.collect()
    return anyscale(plan.requests, vocab, plan.seed, plan.lengths), {"vocab": vocab}


def run(plan: Plan, out: Path, smoke: bool, command: str, base_url: str | None = None,
        systems: tuple[str, ...] = SYSTEMS) -> dict[str, Any]:
    import ray
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    work, model_info = make_workload(plan)
    report: dict[str, Any] = {
        "meta": {
            "command": command, "smoke": smoke, "model": plan.model, "dtype": "float32", "device": "cpu",
            "threads": plan.threads, "max_batch_size": plan.max_batch_size, "requests": plan.requests,
            "concurrency": plan.concurrency, "cap_s": plan.cap_s, "batch_wait_timeout_s": plan.batch_wait_timeout_s,
            "deployment_limit": deployment_limit(plan), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__,
            "workload": {"description": work.description, "params": work.params, "summary": work.summary(),
                         "prompts": f"random token ids in [{min(100, model_info['vocab'] // 4)}, "
                                    f"{model_info['vocab']}), not text"},
            "fairness": fairness(plan),
        },
        "systems": {},
    }
    with serve_instance(base_url, num_cpus=max(4, plan.threads)) as url:
        for system in systems:
            report["systems"][system] = run_system(system, plan, url, work)
            add_ratios(report)
            write(report, out)  # after every system, so an interrupted run keeps what it finished
    return report


def add_ratios(report: dict[str, Any]) -> None:
    plain = report["systems"].get("plain")
    for r in report["systems"].values():
        r["ratio_vs_plain"] = r["tokens_per_s"] / plain["tokens_per_s"] if plain and plain["tokens_per_s"] else None
    baton = report["systems"].get("baton")
    report["ratio_baton_over_plain"] = baton["ratio_vs_plain"] if baton else None


def main(argv: list[str] | None = None, base_url: str | None = None) -> int:
    """CLI entry point; `base_url` (in-process callers only) uses an already running Serve instance."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, 6 requests, 3 in flight: seconds")
    p.add_argument("--model", default=None, help="'default' (SmolLM2-135M), 'tiny', or what the engine loads")
    p.add_argument("--requests", type=int, default=None, help="measured requests (default 32; smoke 6)")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight (default 16; smoke 3)")
    p.add_argument("--max-batch-size", type=int, default=None, help="BATON rows = @serve.batch size (16)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica (default 2; smoke 1)")
    p.add_argument("--cap", type=float, default=None, help="wall-clock cap per system, s (600; smoke 60)")
    p.add_argument("--batch-wait", type=float, default=None,
                   help=f"@serve.batch batch_wait_timeout_s (default {DEFAULT_BATCH_WAIT_S:g})")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of baton,plain")
    p.add_argument("--no-stream-pass", action="store_true", help="skip BATON's streaming pass (no TTFT)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results; smoke: temp)")
    a = p.parse_args(argv)
    base = SMOKE if a.smoke else FULL
    plan = replace(
        base, model=a.model or base.model, requests=a.requests or base.requests,
        concurrency=a.concurrency or base.concurrency, max_batch_size=a.max_batch_size or base.max_batch_size,
        threads=a.threads or base.threads, cap_s=a.cap or base.cap_s,
        batch_wait_timeout_s=base.batch_wait_timeout_s if a.batch_wait is None else a.batch_wait,
        seed=base.seed if a.seed is None else a.seed, stream_pass=base.stream_pass and not a.no_stream_pass,
    )
    systems = tuple(s.strip() for s in a.systems.split(",") if s.strip())
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems:
        p.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    out = a.out or (Path(tempfile.mkdtemp(prefix="http-load-smoke-")) if a.smoke else RESULTS)
    command = " ".join(["python -m benchmarks.http_load", *(sys.argv[1:] if argv is None else argv)])
    report = run(plan, out, a.smoke, command, base_url=base_url, systems=systems)
    print(markdown(report))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

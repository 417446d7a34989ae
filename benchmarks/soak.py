"""Soak: a bounded run of mixed traffic with one engine replica killed, checked request by request.

    .venv/bin/python -m benchmarks.soak               # default model, 1000 requests, 16 workers, 2 engine replicas
    .venv/bin/python -m benchmarks.soak --smoke       # tiny random Llama, 120 requests (CI: tests/benchmarks)

The BATON application (`deployments.builder.make_app`: the ingress and `--replicas` engine replicas) is
deployed on a local Serve (127.0.0.1, a free port), or on the running one at `base_url` (in-process callers on
the same machine: the kill is a local `os.kill`). Then:

1. **References.** A small set of distinct valid requests (`--distinct`, half completions and half chat; half
   greedy, half sampled with a fixed seed; `ignore_eos`, max_tokens in `--max-tokens`) is run once each, one
   at a time, undisturbed: each one's text is its reference.
2. **Soak.** `--workers` clients take `--requests` seeded jobs in turn from one list: a valid request, unary
   or streamed; a stream whose client disconnects after a few chunks; or a bad input (invalid JSON, a lone
   surrogate in the prompt or the messages, negative max_tokens, priority out of range, wrong types, an
   unknown field, an unknown model, max_tokens beyond the context). When half of the jobs have started,
   `anchors` long streams (a few hundred tokens, checked against their own references like every answer) join
   them, and once each has streamed its first token one engine replica's process is killed (SIGKILL; the
   replica holding the most requests, by the engine deployment's `status` of each replica). The anchors make
   the kill move requests whatever the timing: the valid jobs are short, and one could finish between the
   status reading and the kill.
3. **Settle.** The ingress's in-flight count must return to 0 and every engine replica (the replacement
   included) must hold no running or waiting request.

Checks, each counted: **lost** (a valid request, not disconnected by its client, without a 200 and a whole
answer: a stream without [DONE], with an error event, or not finished by length), **hung** (no answer within
`--timeout` s), **wrong tokens** (a valid answer whose text is not its reference, or whose usage is not
max_tokens; a disconnected stream's text must be a prefix of its reference), **5xx** (any), **bad input not
refused** (a bad input without a 4xx in OpenAI's error shape), the kill, and the end state. Any failure makes
the exit status 1. Writes soak.json and soak.md into --out (default benchmarks/results; a temporary folder for
--smoke).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from benchmarks.compare import _f, _pct, provenance
from benchmarks.serve_local import serve_instance

RESULTS = Path(__file__).resolve().parent / "results"
APP = "soak"
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
KINDS = ("unary", "stream", "disconnect", "bad")
MIX = (0.30, 0.35, 0.15, 0.20)  # the share of each kind among the jobs
ANCHOR = "anchor"  # the long streams around the kill (not among the jobs; summarized as their own kind)
PROBLEMS = ("lost", "hung", "wrong_tokens", "http_5xx", "bad_not_refused")


@dataclass(frozen=True)
class Plan:
    model: str  # "default" (SmolLM2-135M-Instruct) or "tiny" (benchmarks.models.tiny_llama)
    requests: int  # jobs in the soak (references not counted)
    workers: int  # concurrent clients, each sending its next job when the last one ended
    distinct: int  # distinct valid requests the jobs draw from
    max_tokens: tuple[int, int]  # the valid requests' max_tokens, drawn in this range
    replicas: int  # engine replicas
    threads: int  # torch threads per engine replica
    max_batch_size: int  # engine rows
    timeout_s: float  # a request not answered within this is hung
    failover_timeout_s: float  # ServerConfig.failover_timeout_s
    kill_at: float  # the kill comes when this fraction of the jobs has started
    seed: int
    anchors: int = 4  # long streams started just before the kill (two per replica), so that it moves requests
    anchor_tokens: int = 256  # their max_tokens


FULL = Plan(model="default", requests=1000, workers=16, distinct=32, max_tokens=(8, 24), replicas=2, threads=1,
            max_batch_size=16, timeout_s=300.0, failover_timeout_s=120.0, kill_at=0.5, seed=0)
SMOKE = Plan(model="tiny", requests=120, workers=16, distinct=24, max_tokens=(8, 24), replicas=2, threads=1,
             max_batch_size=16, timeout_s=60.0, failover_timeout_s=30.0, kill_at=0.5, seed=0, anchor_tokens=400)


# ---- the requests ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One distinct request: a valid one (`body`, JSON) or a bad input (`raw`, the bytes sent as is)."""

    key: str
    route: str
    body: dict[str, Any] | None = None
    raw: bytes | None = None

    @property
    def max_tokens(self) -> int:
        assert self.body is not None
        return int(self.body["max_tokens"])


@dataclass(frozen=True)
class Job:
    index: int
    kind: str  # one of KINDS
    key: str  # its Spec
    disconnect_after: int = 0  # "disconnect": text chunks read before the client goes away


def _tiny_text(rng: random.Random, words: int) -> str:
    # Ids whose word starts with t0/t1/t2 are left out: those words are special tokens that the tokenizer
    # would also find inside longer words ("t10" -> "t1" + "0").
    ids = [i for i in range(3, 512) if str(i)[0] not in "012"]
    return " ".join(f"t{rng.choice(ids)}" for _ in range(words))


def _texts(model: str, n: int, rng: random.Random) -> list[str]:
    """`n` prompt texts: words of the tiny vocabulary, or short English asks for a real model."""
    if model == "tiny":
        return [_tiny_text(rng, rng.randint(4, 24)) for _ in range(n)]
    from benchmarks.peers.openai_load import CHAT_ASKS, CHAT_TOPICS

    return [CHAT_ASKS[i % len(CHAT_ASKS)].format(CHAT_TOPICS[(i * 7) % len(CHAT_TOPICS)]) for i in range(n)]


def valid_specs(plan: Plan) -> list[Spec]:
    """The distinct valid requests: completions and chat alternate, greedy and seeded sampling alternate in
    pairs, so every combination is present."""
    rng = random.Random(plan.seed)
    specs = []
    for i, text in enumerate(_texts(plan.model, plan.distinct, rng)):
        sampled = (i // 2) % 2 == 1
        params: dict[str, Any] = ({"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i} if sampled
                                  else {"temperature": 0.0})
        params.update(max_tokens=rng.randint(*plan.max_tokens), ignore_eos=True)
        chat = i % 2 == 1
        body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
        key = f"{'chat' if chat else 'completion'}-{'sampled' if sampled else 'greedy'}-{i}"
        specs.append(Spec(key, CHAT if chat else COMPLETIONS, {**body, **params}))
    return specs


def anchor_specs(plan: Plan, valid: list[Spec]) -> list[Spec]:
    """The long streams around the kill: the first two valid requests (a greedy completion and a greedy
    chat) with `plan.anchor_tokens` tokens."""
    return [Spec(f"anchor-{s.key}", s.route, {**(s.body or {}), "max_tokens": plan.anchor_tokens})
            for s in valid[:2]]


def bad_specs(prompt: str) -> list[Spec]:
    """Inputs every server must refuse with a 4xx (never a 5xx, never a stream)."""
    def as_json(key: str, route: str, body: dict[str, Any]) -> Spec:
        # json.dumps escapes a lone surrogate as \\ud800, so the bytes are valid UTF-8 and the JSON decodes.
        return Spec(key, route, raw=json.dumps(body).encode())

    message = [{"role": "user", "content": prompt}]
    return [
        Spec("invalid-json", COMPLETIONS, raw=b'{"prompt": "' + prompt.encode() + b'", "max_tokens": '),
        as_json("surrogate-prompt", COMPLETIONS, {"prompt": prompt + " \ud800", "max_tokens": 4}),
        as_json("surrogate-message", CHAT, {"messages": [{"role": "user", "content": "\ud800" + prompt}],
                                            "max_tokens": 4, "stream": True}),
        as_json("negative-max-tokens", COMPLETIONS, {"prompt": prompt, "max_tokens": -3}),
        as_json("negative-max-tokens-stream", CHAT, {"messages": message, "max_tokens": -1, "stream": True}),
        as_json("priority-out-of-range", COMPLETIONS, {"prompt": prompt, "max_tokens": 4, "priority": 10**9}),
        as_json("max-tokens-a-string", COMPLETIONS, {"prompt": prompt, "max_tokens": "ten"}),
        as_json("temperature-a-string", CHAT, {"messages": message, "temperature": "hot"}),
        as_json("messages-a-string", CHAT, {"messages": prompt}),
        as_json("prompt-an-object", COMPLETIONS, {"prompt": {"text": prompt}}),
        as_json("unknown-field", COMPLETIONS, {"prompt": prompt, "temperatur": 0.5}),
        as_json("unknown-model", COMPLETIONS, {"model": "no-such-model", "prompt": prompt, "max_tokens": 4}),
        as_json("beyond-context", COMPLETIONS, {"prompt": prompt, "max_tokens": 10**7}),
        as_json("beyond-context-chat", CHAT, {"messages": message, "max_tokens": 10**7, "stream": True}),
    ]


def jobs(plan: Plan, valid: list[Spec], bad: list[Spec]) -> list[Job]:
    """The soak's jobs, seeded: kinds in MIX's proportions, specs drawn uniformly."""
    rng = random.Random(plan.seed + 1)
    out = []
    for i, kind in enumerate(rng.choices(KINDS, weights=MIX, k=plan.requests)):
        spec = rng.choice(bad if kind == "bad" else valid)
        out.append(Job(i, kind, spec.key, rng.randint(1, 4) if kind == "disconnect" else 0))
    return out


# ---- the client --------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What the client saw for one request."""

    index: int
    kind: str
    key: str
    status: int | None = None
    text: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    done: bool = False  # unary: a body was read; stream: [DONE] arrived
    disconnected: bool = False  # the client went away before the end
    error_events: list[Any] = field(default_factory=list)
    error_body: Any = None  # a non-200 answer's JSON (or its text)
    exception: str | None = None
    hung: bool = False
    latency_s: float | None = None
    problem: str | None = None  # one of PROBLEMS, or None
    detail: str = ""


def _piece(choice: dict[str, Any]) -> str:
    """The text of a completion or chat choice, whole or a stream's delta."""
    if "text" in choice:
        return str(choice["text"] or "")
    return str((choice.get("message") or choice.get("delta") or {}).get("content") or "")


def _read_choice(o: Outcome, data: dict[str, Any]) -> None:
    for choice in data.get("choices") or []:
        o.text += _piece(choice)
        if choice.get("finish_reason"):
            o.finish_reasons.append(choice["finish_reason"])
    if data.get("usage"):
        o.completion_tokens = data["usage"]["completion_tokens"]


async def _unary(client: httpx.AsyncClient, url: str, spec: Spec, o: Outcome) -> None:
    r = await client.post(url, json=spec.body)
    o.status = r.status_code
    if r.status_code != 200:
        o.error_body = _json_or_text(r.text)
        return
    _read_choice(o, r.json())
    o.done = True


async def _stream(client: httpx.AsyncClient, url: str, spec: Spec, o: Outcome, disconnect_after: int,
                  started: asyncio.Event | None = None) -> None:
    """`started` (if given) is set when the first text arrives."""
    body = {**(spec.body or {}), "stream": True, "stream_options": {"include_usage": True}}
    chunks = 0
    async with client.stream("POST", url, json=body) as r:
        o.status = r.status_code
        if r.status_code != 200:
            o.error_body = _json_or_text((await r.aread()).decode(errors="replace"))
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                o.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                o.error_events.append(event["error"])
                continue
            before = len(o.text)
            _read_choice(o, event)
            chunks += len(o.text) > before
            if started is not None and o.text:
                started.set()
            if disconnect_after and chunks >= disconnect_after and not o.finish_reasons:
                o.disconnected = True  # leaving the `async with` closes the connection mid-stream
                return


async def _bad(client: httpx.AsyncClient, url: str, spec: Spec, o: Outcome) -> None:
    assert spec.raw is not None
    r = await client.post(url, content=spec.raw, headers={"content-type": "application/json"})
    o.status = r.status_code
    o.error_body = _json_or_text(r.text)


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text[:500]


async def send(client: httpx.AsyncClient, prefix: str, job: Job, spec: Spec, timeout_s: float,
               started: asyncio.Event | None = None) -> Outcome:
    """Run one job; never raises (a failure is in the outcome). A stream sets `started` at its first text, and
    every job sets it when it ends (so that nothing waits on a request that failed)."""
    o = Outcome(job.index, job.kind, job.key)
    url = f"{prefix}{spec.route}"
    t0 = time.perf_counter()
    try:
        if job.kind == "bad":
            coro = _bad(client, url, spec, o)
        elif job.kind == "unary":
            coro = _unary(client, url, spec, o)
        else:
            coro = _stream(client, url, spec, o, job.disconnect_after, started)
        await asyncio.wait_for(coro, timeout_s)
    except TimeoutError:
        o.hung = True
    except Exception as e:  # noqa: BLE001 - a broken connection or bad payload is this request's failure
        o.exception = f"{type(e).__name__}: {e}"[:300]
    finally:
        if started is not None:
            started.set()
    o.latency_s = time.perf_counter() - t0
    return o


# ---- the checks --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    text: str
    completion_tokens: int


def _openai_error_shape(body: Any) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)


def judge(o: Outcome, ref: Reference | None) -> tuple[str | None, str]:
    """The outcome's problem (one of PROBLEMS) and why, or (None, "")."""
    if o.hung:
        return "hung", "no answer in time"
    if o.status is not None and o.status >= 500:
        return "http_5xx", f"HTTP {o.status}: {str(o.error_body)[:200]}"
    if o.kind == "bad":
        if o.status is None or not 400 <= o.status < 500 or not _openai_error_shape(o.error_body):
            return "bad_not_refused", f"HTTP {o.status}: {str(o.error_body)[:200]}"
        return None, ""
    assert ref is not None
    if o.exception or o.status != 200 or o.error_events:
        return "lost", o.exception or f"HTTP {o.status}: {str(o.error_body or o.error_events)[:200]}"
    if o.disconnected:
        if not ref.text.startswith(o.text):
            return "wrong_tokens", f"disconnected after {o.text!r}, not a prefix of {ref.text!r}"
        return None, ""
    if not o.done or o.finish_reasons != ["length"]:
        return "lost", f"done={o.done}, finish reasons {o.finish_reasons}"
    if o.text != ref.text or o.completion_tokens != ref.completion_tokens:
        return "wrong_tokens", (f"{o.completion_tokens} tokens {o.text!r}, want {ref.completion_tokens} "
                                f"{ref.text!r}")
    return None, ""


async def references(url: str, valid: list[Spec], timeout_s: float) -> dict[str, Reference]:
    """Each valid request's undisturbed answer, one at a time (unary); a reference that fails stops the run."""
    refs = {}
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, trust_env=False) as client:
        for spec in valid:
            o = await send(client, f"/{APP}", Job(-1, "unary", spec.key), spec, timeout_s)
            if not o.done or o.finish_reasons != ["length"] or o.completion_tokens != spec.max_tokens:
                raise RuntimeError(f"the reference request {spec.key} failed: {asdict(o)}")
            refs[spec.key] = Reference(o.text, spec.max_tokens)
    return refs


# ---- the Serve side ----------------------------------------------------------------------------------------------
def build_app(plan: Plan) -> Any:
    """The BATON application; admission limits above the workers (a 429 would count as lost)."""
    from configs import EngineConfig
    from configs.serve import ServerConfig
    from deployments.builder import make_app

    engine = EngineConfig(model=plan.model, dtype="float32", device="cpu", policy="baton-pd",
                          max_batch_size=plan.max_batch_size, num_threads=plan.threads,
                          max_model_len=512 if plan.model == "tiny" else 1024)
    front = None
    if plan.model == "tiny":
        from benchmarks.models import tiny_engine_front

        front = tiny_engine_front
    limit = max(64, 4 * plan.workers)
    server = ServerConfig(max_pending_requests=limit, failover_timeout_s=plan.failover_timeout_s)
    options = {"num_replicas": plan.replicas, "ray_actor_options": {"num_cpus": plan.threads},
               "health_check_period_s": 2, "health_check_timeout_s": 30}
    return make_app(engine, server, front, engine_options=options,
                    ingress_options={"max_ongoing_requests": limit + 16})


def engine_statuses(app: str, want: int, timeout_s: float, must: frozenset[int] = frozenset()) -> dict[int, Any]:
    """The latest status of each of the app's engine replicas that answered, by process id: asks until `want`
    distinct ones (and every pid in `must`) answered, or `timeout_s` passed."""
    from ray import serve

    handle = serve.get_deployment_handle("BatonEngine", app)
    statuses: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (len(statuses) < want or not must <= statuses.keys()):
        try:
            status = handle.status.remote().result(timeout_s=5)
        except Exception:  # noqa: BLE001 - a replica that is going or coming: ask again
            time.sleep(0.5)
            continue
        statuses[status.pid] = status
    return statuses


def ingress_stats(url: str) -> dict[str, float]:
    """The app's /stats metrics: one engine replica's, with the ingress's counters."""
    return dict(httpx.get(f"{url}/{APP}/stats", timeout=10, trust_env=False).json()["metrics"])


def settle(url: str, survivors: frozenset[int], timeout_s: float = 30.0) -> dict[str, Any]:
    """Wait (up to `timeout_s`) for the ingress's in-flight count to reach 0 and for the engine replicas that
    answer (every survivor of the kill among them; Serve's replacement too once it is up) to hold no rows."""
    deadline = time.monotonic() + timeout_s
    in_flight = ingress_stats(url)["server_requests_in_flight"]
    while in_flight and time.monotonic() < deadline:
        time.sleep(0.25)
        in_flight = ingress_stats(url)["server_requests_in_flight"]
    statuses = engine_statuses(APP, 1, max(5.0, deadline - time.monotonic()), survivors)
    while any(_rows(s) for s in statuses.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
        statuses = engine_statuses(APP, 1, max(5.0, deadline - time.monotonic()), survivors)
    return {"in_flight": in_flight, "engine_rows": {str(pid): _rows(s) for pid, s in statuses.items()},
            "survivors_answered": survivors <= statuses.keys()}


def _rows(status: Any) -> float:
    return float(status.metrics["num_requests_running"] + status.metrics["num_requests_waiting"])


def kill_one_engine_replica(replicas: int, timeout_s: float = 10.0) -> int:
    """SIGKILL the engine replica holding the most requests (running + waiting), so that the kill moves some:
    Serve's router may leave a replica idle, and a status call goes to the least busy one, so every replica is
    asked, again until one holds a request (or `timeout_s` passed). Its pid."""
    deadline = time.monotonic() + timeout_s
    while True:
        statuses = engine_statuses(APP, replicas, 30)
        pid = max(statuses, key=lambda p: _rows(statuses[p]))
        if _rows(statuses[pid]) > 0 or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return pid


# ---- the run -----------------------------------------------------------------------------------------------------
async def soak(url: str, plan: Plan, work: list[Job], specs: dict[str, Spec], refs: dict[str, Reference],
               progress: Callable[[int, int], None], anchors: list[Spec] | None = None,
               ) -> tuple[list[Outcome], dict[str, Any], float]:
    """`plan.workers` clients over the jobs, each outcome judged as it ends; when `plan.kill_at` of the jobs
    have started, `plan.anchors` long streams (drawn in turn from `anchors`) join them, and the kill comes once
    each anchor has streamed its first text (or ended)."""
    todo = iter(work)
    outcomes: list[Outcome] = []
    anchored: list[Outcome] = []
    kill: dict[str, Any] = {}
    kill_task: list[asyncio.Task[None]] = []
    kill_index = int(plan.kill_at * len(work))
    t0 = time.perf_counter()

    async def anchor(client: httpx.AsyncClient, i: int, spec: Spec, started: asyncio.Event) -> None:
        o = await send(client, f"/{APP}", Job(len(work) + i, ANCHOR, spec.key), spec, plan.timeout_s, started)
        o.problem, o.detail = judge(o, refs.get(spec.key))
        if "done_s" in kill:  # how long it outlived the kill: the margin that made the kill move it
            kill.setdefault("anchors_ended_after_kill_s", []).append(time.perf_counter() - t0 - kill["done_s"])
        anchored.append(o)

    async def do_kill(client: httpx.AsyncClient) -> None:
        kill["at_s"] = time.perf_counter() - t0
        kill["jobs_done_before"] = len(outcomes)
        started = [asyncio.Event() for _ in range(plan.anchors)]
        tasks = [asyncio.create_task(anchor(client, i, anchors[i % len(anchors)], e))
                 for i, e in enumerate(started)] if anchors else []
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started[:len(tasks)])), plan.timeout_s)
        kill["anchors_started_s"] = time.perf_counter() - t0
        kill["pid"] = await asyncio.to_thread(kill_one_engine_replica, plan.replicas)
        kill["done_s"] = time.perf_counter() - t0
        await asyncio.gather(*tasks)

    async def worker(client: httpx.AsyncClient) -> None:
        for job in todo:  # one shared iterator: each job is taken once
            if job.index == kill_index:
                kill_task.append(asyncio.create_task(do_kill(client)))
            o = await send(client, f"/{APP}", job, specs[job.key], plan.timeout_s)
            o.problem, o.detail = judge(o, refs.get(job.key))
            outcomes.append(o)
            progress(len(outcomes), sum(o.problem is not None for o in outcomes))

    limits = httpx.Limits(max_connections=4 * plan.workers)
    async with httpx.AsyncClient(base_url=url, timeout=plan.timeout_s + 30, limits=limits, trust_env=False) as c:
        await asyncio.gather(*(worker(c) for _ in range(plan.workers)))
        for task in kill_task:
            await task
    return sorted(outcomes + anchored, key=lambda o: o.index), kill, time.perf_counter() - t0


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    """Counts per kind and problem, latency of the good valid answers, the bad inputs' statuses."""
    kinds: dict[str, Any] = {}
    for kind in KINDS + ((ANCHOR,) if any(o.kind == ANCHOR for o in outcomes) else ()):
        mine = [o for o in outcomes if o.kind == kind]
        problems = Counter(o.problem for o in mine if o.problem)
        kinds[kind] = {"sent": len(mine), "ok": len(mine) - sum(problems.values()),
                       **{p: problems.get(p, 0) for p in PROBLEMS}}
    answered = [o.latency_s for o in outcomes if o.kind in ("unary", "stream") and o.problem is None
                and o.latency_s is not None]
    bad_status: dict[str, Counter[int]] = {}
    for o in outcomes:
        if o.kind == "bad":
            bad_status.setdefault(o.key, Counter())[o.status or 0] += 1
    return {
        "kinds": kinds,
        "problems": {p: sum(k[p] for k in kinds.values()) for p in PROBLEMS},
        "latency_s": {"p50": _pct(answered, 50), "p99": _pct(answered, 99), "max": max(answered, default=None)},
        "disconnected": sum(o.disconnected for o in outcomes),
        "bad_input_status": {k: dict(sorted(v.items())) for k, v in sorted(bad_status.items())},
        "failures": [asdict(o) for o in outcomes if o.problem][:25],
    }


def run(plan: Plan, command: str, smoke: bool, base_url: str | None = None) -> dict[str, Any]:
    import ray
    import torch
    import transformers
    from ray import serve

    from benchmarks.http_load import wait_ready

    valid = valid_specs(plan)
    anchors = anchor_specs(plan, valid)
    bad = bad_specs(str((valid[0].body or {})["prompt"]))
    specs = {s.key: s for s in valid + bad + anchors}
    work = jobs(plan, valid, bad)
    meta: dict[str, Any] = {"command": command, "smoke": smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__,
            "plan": asdict(plan), "mix": dict(zip(KINDS, MIX, strict=True)), "bad_inputs": [s.key for s in bad],
            "load_average_1min": [os.getloadavg()[0]]}
    with serve_instance(base_url, num_cpus=max(4, plan.replicas * plan.threads + 1)) as url:
        t_deploy = time.perf_counter()
        serve.run(build_app(plan), name=APP, route_prefix=f"/{APP}")
        try:
            wait_ready(f"{url}/{APP}/health", timeout_s=600)
            meta["deploy_s"] = time.perf_counter() - t_deploy
            pids_before = sorted(engine_statuses(APP, plan.replicas, 60))
            _say(f"deployed in {meta['deploy_s']:.1f} s, engine replicas {pids_before}; references for "
                 f"{len(valid)} distinct requests and {len(anchors)} anchors")
            t_ref = time.perf_counter()
            refs = asyncio.run(references(url, valid + anchors, plan.timeout_s))
            meta["references_s"] = time.perf_counter() - t_ref
            failovers_before = ingress_stats(url)["server_failovers_total"]
            _say(f"references in {meta['references_s']:.1f} s; soak: {plan.requests} jobs, {plan.workers} workers")
            outcomes, kill, wall = asyncio.run(soak(url, plan, work, specs, refs, _progress(plan.requests),
                                                    anchors))
            _say(f"soak done in {wall:.1f} s; killed pid {kill.get('pid')} at {kill.get('at_s', 0):.1f} s; settling")
            meta["load_average_1min"].append(os.getloadavg()[0])
            end = settle(url, frozenset(pids_before) - {kill.get("pid")})
            failovers = ingress_stats(url)["server_failovers_total"] - failovers_before
        finally:
            serve.delete(APP)
    report = {"meta": meta, **summarize(outcomes), "kill": {**kill, "pids_before": pids_before},
              "failovers": failovers, "end": end, "wall_s": wall, "requests_per_s": len(outcomes) / wall}
    report["passed"] = passed(report)
    return report


def passed(report: dict[str, Any]) -> bool:
    """Every check: no problem of any kind, the kill happened and moved requests, nothing left in flight."""
    return (not any(report["problems"].values()) and "pid" in report["kill"] and report["failovers"] > 0
            and report["end"]["in_flight"] == 0 and report["end"]["survivors_answered"]
            and report["end"]["engine_rows"] and not any(report["end"]["engine_rows"].values()))


def _say(line: str) -> None:
    print(f"[soak] {line}", file=sys.stderr, flush=True)


def _progress(total: int) -> Callable[[int, int], None]:
    step = max(1, total // 10)

    def report(done: int, problems: int) -> None:
        if done % step == 0 or done == total:
            _say(f"{done}/{total} done, {problems} with a problem")

    return report


# ---- report ------------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    m, plan, kill, end = report["meta"], report["meta"]["plan"], report["kill"], report["end"]
    lines = [
        f"# Soak ({'smoke, ' if m['smoke'] else ''}{plan['model']}, {plan['requests']} requests, "
        f"{plan['workers']} workers, {plan['replicas']} engine replicas, one killed)",
        "",
        f"{provenance(m, 'ray ' + m['ray'])}. {plan['distinct']} distinct valid requests (completions and chat, "
        f"greedy and seeded sampling, ignore_eos, max_tokens {plan['max_tokens'][0]}-{plan['max_tokens'][1]}), "
        f"each answer compared with its undisturbed reference; {len(m['bad_inputs'])} kinds of bad input.",
        "",
        "| kind | sent | ok | lost | hung | wrong tokens | 5xx | bad input not refused |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, k in report["kinds"].items():
        lines.append(f"| {kind} | {k['sent']} | {k['ok']} | {k['lost']} | {k['hung']} | {k['wrong_tokens']} "
                     f"| {k['http_5xx']} | {k['bad_not_refused']} |")
    lat = report["latency_s"]
    lines += [
        "",
        f"- **{'PASSED' if report['passed'] else 'FAILED'}**: soak wall {report['wall_s']:.1f} s "
        f"({report['requests_per_s']:.1f} requests/s) after {m['deploy_s']:.1f} s to deploy and "
        f"{m['references_s']:.1f} s for the references; {report['disconnected']} streams disconnected by "
        "their client mid-way." + _load(m),
        f"- Kill: SIGKILL of engine replica pid {kill.get('pid', 'none')} at {_f(kill.get('at_s'), '.1f')} s, "
        f"after {kill.get('jobs_done_before', 'n/a')} jobs had finished; failovers (continuations on another "
        f"replica): {report['failovers']:.0f}." + _anchors(plan, kill),
        f"- Latency of the valid unary and streamed requests (client, end to end): p50 "
        f"{_f(lat['p50'], '.2f')} s, p99 {_f(lat['p99'], '.2f')} s, max {_f(lat['max'], '.2f')} s.",
        f"- At the end: ingress in flight {end['in_flight']:.0f}; running + waiting requests of the engine "
        f"replicas that answered, by pid: {end['engine_rows']}.",
        "- Bad inputs, HTTP status x times seen: "
        + ", ".join(f"{k} " + " ".join(f"{code} x{n}" for code, n in v.items())
                    for k, v in report["bad_input_status"].items()) + ".",
    ]
    for f in report["failures"][:10]:
        lines.append(f"- failure: job {f['index']} ({f['kind']}, {f['key']}): {f['problem']}: {f['detail']}")
    return "\n".join(lines) + "\n"


def _anchors(plan: dict[str, Any], kill: dict[str, Any]) -> str:
    ended = kill.get("anchors_ended_after_kill_s")  # absent from reports made before the anchors
    if not plan.get("anchors") or "anchors_started_s" not in kill:
        return ""
    margin = f"; they ended {min(ended):.1f}-{max(ended):.1f} s after it" if ended else ""
    return (f" {plan['anchors']} anchor streams of {plan['anchor_tokens']} tokens joined at the kill's turn; each "
            f"had streamed its first text by {kill['anchors_started_s']:.1f} s, when the replica was chosen{margin}.")


def _load(meta: dict[str, Any]) -> str:
    load = meta.get("load_average_1min")  # absent from reports made before it was recorded
    if not load or len(load) < 2:
        return ""
    return f" 1-min load average {load[0]:.1f} at the start, {load[1]:.1f} at the soak's end."


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    (out / "soak.md").write_text(markdown(report))


def main(argv: list[str] | None = None, base_url: str | None = None) -> int:
    """CLI entry point; `base_url` (in-process callers only) uses an already running Serve instance. Exit
    status 0 only when every check passed."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help=f"tiny random Llama, {SMOKE.requests} requests")
    p.add_argument("--model", default=None, help="'default' (SmolLM2-135M) or 'tiny'")
    p.add_argument("--requests", type=int, default=None, help=f"jobs (default {FULL.requests})")
    p.add_argument("--workers", type=int, default=None, help=f"concurrent clients (default {FULL.workers})")
    p.add_argument("--distinct", type=int, default=None, help=f"distinct valid requests ({FULL.distinct})")
    p.add_argument("--max-tokens", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                   help=f"range of the valid requests' max_tokens (default {FULL.max_tokens})")
    p.add_argument("--replicas", type=int, default=None, help=f"engine replicas (default {FULL.replicas})")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a request counts as hung")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results; smoke: temp)")
    a = p.parse_args(argv)
    base = SMOKE if a.smoke else FULL
    plan = replace(base, model=a.model or base.model, requests=a.requests or base.requests,
                   workers=a.workers or base.workers, distinct=a.distinct or base.distinct,
                   max_tokens=tuple(a.max_tokens) if a.max_tokens else base.max_tokens,
                   replicas=a.replicas or base.replicas, timeout_s=a.timeout or base.timeout_s,
                   seed=base.seed if a.seed is None else a.seed)
    if plan.distinct < 4 or plan.replicas < 1 or plan.requests < 1 or not 1 <= plan.max_tokens[0] <= plan.max_tokens[1]:
        p.error(f"need --distinct >= 4, --replicas >= 1, --requests >= 1 and 1 <= MIN <= MAX: {plan}")
    out = a.out or (Path(tempfile.mkdtemp(prefix="soak-smoke-")) if a.smoke else RESULTS)
    command = " ".join(["python -m benchmarks.soak", *(sys.argv[1:] if argv is None else argv)])
    report = run(plan, command, a.smoke, base_url)
    write(report, out)
    print(markdown(report))
    print(f"results in {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Helpers for the Serve tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from benchmarks.serve_local import free_port  # noqa: F401  (re-exported: one loopback port helper)
from tests.deployments.fake_engine import FakeAsyncEngine


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1, what: str = ""
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what or predicate} (last value: {last!r})")


def fake_factory(**kwargs: Any) -> Callable[..., FakeAsyncEngine]:
    """A picklable front factory for `make_app(front_factory=...)`: the fake engine with these options."""
    return functools.partial(FakeAsyncEngine, **kwargs)


def ingress_metrics(base: str, timeout_s: float = 30) -> dict[str, float]:
    """/stats of the app at `base`: an engine replica's metrics with the ingress's counters. Waits out a
    moment without an engine replica to answer (a 503 while Serve replaces one, e.g. after a health check
    that timed out on a busy machine); fails after `timeout_s`."""
    answer = wait_until(lambda: (r := httpx.get(f"{base}/stats", timeout=10)).status_code == 200 and r,
                        timeout_s=timeout_s, interval_s=0.2, what=f"{base}/stats to answer 200")
    return dict(answer.json()["metrics"])


# --- killing an engine replica under load (tests/deployments/test_failover.py, test_real_model.py) -------


def engine_pids(app: str, want: int) -> set[int]:
    """The process ids of the app's engine replicas (asks until `want` distinct ones answered)."""
    handle = serve.get_deployment_handle("BatonEngine", app)
    pids: set[int] = set()
    deadline = time.monotonic() + 30
    while len(pids) < want and time.monotonic() < deadline:
        pids.add(handle.status.remote().result().pid)
    assert len(pids) == want, pids
    return pids


def busiest(pids: set[int], submissions: Path) -> int:
    """Of `pids`, the engine replica that took the most requests (fake_engine's `submissions_dir` files)."""
    taken = {pid: len(list(submissions.glob(f"{pid}-*"))) for pid in pids}
    pid = max(taken, key=lambda p: taken[p])
    assert taken[pid] > 0, f"no engine replica took a request: {taken}"
    return pid


async def stream_one(client: httpx.AsyncClient, path: str, body: dict[str, Any], seen: list[int]) -> dict[str, Any]:
    """One streamed completion: its text, finish reason, error events and whether it ended with [DONE];
    `seen[0]` counts the characters received so far."""
    text, reasons, errors, done = [], [], [], False
    async with client.stream("POST", f"{path}/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            if "error" in event:
                errors.append(event["error"])
                continue
            for choice in event["choices"]:
                text.append(choice["text"])
                seen[0] += len(choice["text"])
                if choice["finish_reason"]:
                    reasons.append(choice["finish_reason"])
    return {"text": "".join(text), "reasons": reasons, "errors": errors, "done": done}


async def unary_one(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(f"{path}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "reasons": [choice["finish_reason"]], "errors": [], "done": True}


def run_and_kill(base: str, path: str, app: str, streams: list[dict[str, Any]], unary: list[dict[str, Any]],
                 replicas: int | None, kill_after: int | None = None,
                 submissions: Path | None = None) -> tuple[list[dict[str, Any]], list[int]]:
    """The `streams` and `unary` completion bodies at once; with `replicas`, once `kill_after` streams (all by
    default) have text, SIGKILL one of the app's engine replica processes (it has that many): the one that
    took the most requests when the fake engines record them in `submissions` (Serve's router may leave a
    replica idle), else any. Returns the results (streams first) and the /health codes seen after the kill."""
    pids = engine_pids(app, replicas) if replicas else set()
    seen = [[0] for _ in streams]
    health: list[int] = []

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            tasks = [asyncio.create_task(stream_one(client, path, b, seen[i])) for i, b in enumerate(streams)]
            tasks += [asyncio.create_task(unary_one(client, path, b)) for b in unary]
            if not pids:
                return [await t for t in tasks]
            while sum(s[0] > 0 for s in seen) < (kill_after or len(seen)):
                await asyncio.sleep(0.05)
            os.kill(busiest(pids, submissions) if submissions else next(iter(pids)), signal.SIGKILL)
            while not all(t.done() for t in tasks):
                t0 = time.monotonic()
                health.append((await client.get(f"{path}/health", timeout=5)).status_code)
                assert time.monotonic() - t0 < 3, "/health must answer at once"
                await asyncio.sleep(0.2)
            return [t.result() for t in tasks]

    return asyncio.run(run()), health



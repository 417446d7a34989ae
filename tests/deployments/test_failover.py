"""Engine replicas killed under load (`kill -9` of the replica's process), on real Ray Serve on loopback.

8 streams and 8 queued unary requests run when one engine replica's process is killed. Every request
completes, each exactly as an undisturbed run gives it (the fake engine's output is a pure function of the
prompt), with no error event; streams that had tokens continue where they stopped on another replica (or on
Serve's replacement, with the default single replica, during which /health answers 503); the ingress's
in-flight count and the engines' rows return to 0. When no replica can take a stream within the failover
timeout, the stream ends with an OpenAI-shaped error event and [DONE].
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve
from ray.serve import RunTarget

from configs import EngineConfig
from configs.serve import ServerConfig
from deployments.builder import make_app
from tests.deployments.serve_testing import fake_factory, wait_until

ENGINE = EngineConfig(model="fake", max_batch_size=8, max_model_len=4096)
STEP_S = 0.03  # per fake iteration: a 60-token stream takes ~2 s
MAX_TOKENS = 60
ENGINE_OPTIONS = {"ray_actor_options": {"num_cpus": 0}, "health_check_period_s": 1, "health_check_timeout_s": 5}


def _apps(marker: Path) -> list[RunTarget]:
    fake = fake_factory(step_delay_s=STEP_S)
    broken = fake_factory(step_delay_s=STEP_S, refuse_start_if=str(marker))
    return [
        RunTarget(make_app(ENGINE, ServerConfig(), fake, engine_options={**ENGINE_OPTIONS, "num_replicas": 2}),
                  "two", "/two"),
        RunTarget(make_app(ENGINE, ServerConfig(), fake, engine_options={**ENGINE_OPTIONS, "num_replicas": 1}),
                  "one", "/one"),
        RunTarget(make_app(ENGINE, ServerConfig(failover_timeout_s=3), broken,
                           engine_options={**ENGINE_OPTIONS, "num_replicas": 1}), "gone", "/gone"),
    ]


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Once this file exists, the "gone" app's engine replicas refuse to start."""
    return tmp_path_factory.mktemp("failover") / "no-more-engines"


@pytest.fixture(scope="module")
def base_url(serve_instance: str, marker: Path) -> Iterator[str]:
    serve.run_many(_apps(marker))
    yield serve_instance


def expected(prompt: str) -> str:
    """The fake engine's undisturbed completion with ignore_eos: the prompt cycled to MAX_TOKENS characters."""
    return (prompt * (MAX_TOKENS // len(prompt) + 1))[:MAX_TOKENS]


def engine_pids(app: str, want: int) -> set[int]:
    """The process ids of the app's engine replicas (asks until `want` distinct ones answered)."""
    handle = serve.get_deployment_handle("BatonEngine", app)
    pids: set[int] = set()
    deadline = time.monotonic() + 30
    while len(pids) < want and time.monotonic() < deadline:
        pids.add(handle.status.remote().result().pid)
    assert len(pids) == want, pids
    return pids


def ingress_metrics(base: str) -> dict[str, float]:
    return dict(httpx.get(f"{base}/stats", timeout=10).json()["metrics"])


async def stream_one(client: httpx.AsyncClient, path: str, prompt: str, seen: list[int]) -> dict[str, Any]:
    """One streamed completion: its text, finish reason, error events and whether it ended with [DONE]."""
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    text, reasons, errors, done = [], [], [], False
    async with client.stream("POST", f"{path}/v1/completions", json=body) as r:
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


async def unary_one(client: httpx.AsyncClient, path: str, prompt: str) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    r = await client.post(f"{path}/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "reasons": [choice["finish_reason"]], "errors": [], "done": True}


def run_and_kill(base: str, app: str, replicas: int) -> tuple[list[dict[str, Any]], list[str], list[int]]:
    """8 streams + 8 unary requests; once every stream has text, SIGKILL one engine replica's process.
    Returns the results, the prompts in the same order, and the /health codes seen after the kill."""
    pids = engine_pids(app, replicas)
    prompts = [f"stream {i}: abcdefghij" for i in range(8)] + [f"unary {i}: klmnopqrst" for i in range(8)]
    seen = [[0] for _ in range(8)]
    health: list[int] = []

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            tasks = [asyncio.create_task(stream_one(client, f"/{app}", p, seen[i])) for i, p in enumerate(prompts[:8])]
            tasks += [asyncio.create_task(unary_one(client, f"/{app}", p)) for p in prompts[8:]]
            while not all(s[0] > 0 for s in seen):
                await asyncio.sleep(0.05)
            os.kill(next(iter(pids)), signal.SIGKILL)
            while not all(t.done() for t in tasks):
                t0 = time.monotonic()
                health.append((await client.get(f"/{app}/health", timeout=5)).status_code)
                assert time.monotonic() - t0 < 3, "/health must answer at once"
                await asyncio.sleep(0.2)
            return [t.result() for t in tasks]

    return asyncio.run(run()), prompts, health


@pytest.mark.parametrize("app,replicas", [("two", 2), ("one", 1)])
def test_a_killed_engine_replica_loses_nothing(base_url: str, app: str, replicas: int) -> None:
    base = f"{base_url}/{app}"
    before = ingress_metrics(base)["server_failovers_total"]
    results, prompts, health = run_and_kill(base_url, app, replicas)
    for prompt, result in zip(prompts, results, strict=True):
        assert result["errors"] == [] and result["done"], result
        assert result["text"] == expected(prompt), (prompt, result)  # nothing lost, nothing repeated
        assert result["reasons"] == ["length"]
    assert ingress_metrics(base)["server_failovers_total"] > before  # requests did move to another replica
    if replicas == 1:
        assert 503 in health  # while Serve replaced the only engine replica, /health said so
    assert health[-1] == 200 or httpx.get(f"{base}/health", timeout=5).status_code == 200
    wait_until(lambda: ingress_metrics(base)["server_requests_in_flight"] == 0, timeout_s=10, what="in-flight 0")
    wait_until(lambda: ingress_metrics(base)["num_requests_running"] == 0, timeout_s=10, what="rows 0")


def test_a_stream_with_no_replica_to_continue_on_ends_with_an_error_event(base_url: str, marker: Path) -> None:
    """The replacement never starts (its factory refuses): after failover_timeout_s the open stream gets an
    OpenAI-shaped error event, then [DONE]; the slot is released."""
    (pid,) = engine_pids("gone", 1)
    seen = [0]

    async def run() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
            task = asyncio.create_task(stream_one(client, "/gone", "abcdefghij", seen))
            while seen[0] == 0:
                await asyncio.sleep(0.05)
            marker.touch()
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            result = await task
            result["after_kill_s"] = time.monotonic() - t0
            return result

    result = asyncio.run(run())
    assert result["done"] and len(result["errors"]) == 1, result
    assert result["errors"][0]["code"] == "engine_unavailable"
    assert 0 < len(result["text"]) < MAX_TOKENS
    assert 2.5 < result["after_kill_s"] < 20
    assert httpx.get(f"{base_url}/gone/health", timeout=5).status_code == 503
    # The ingress still answers, and holds no slot for the failed stream.
    assert httpx.get(f"{base_url}/gone/v1/models", timeout=5).status_code == 200

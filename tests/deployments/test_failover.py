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
from tests.deployments.serve_testing import (
    engine_pids,
    fake_factory,
    ingress_metrics,
    run_and_kill,
    stream_one,
    wait_until,
)

ENGINE = EngineConfig(model="fake", max_batch_size=8, max_model_len=4096)
STEP_S = 0.03  # per fake iteration: a 60-token stream takes ~2 s
MAX_TOKENS = 60
ENGINE_OPTIONS = {"ray_actor_options": {"num_cpus": 0}, "health_check_period_s": 1, "health_check_timeout_s": 5}


def _apps(marker: Path, submissions: Path) -> list[RunTarget]:
    fake = fake_factory(step_delay_s=STEP_S, submissions_dir=str(submissions))
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
def submissions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the "two" and "one" apps' fake engines record each request they take (the busiest is killed)."""
    return tmp_path_factory.mktemp("submissions")


@pytest.fixture(scope="module")
def base_url(serve_instance: str, marker: Path, submissions: Path) -> Iterator[str]:
    serve.run_many(_apps(marker, submissions))
    yield serve_instance


def expected(prompt: str) -> str:
    """The fake engine's undisturbed completion with ignore_eos: the prompt cycled to MAX_TOKENS characters."""
    return (prompt * (MAX_TOKENS // len(prompt) + 1))[:MAX_TOKENS]


@pytest.mark.parametrize("app,replicas", [("two", 2), ("one", 1)])
def test_a_killed_engine_replica_loses_nothing(base_url: str, submissions: Path, app: str, replicas: int) -> None:
    base = f"{base_url}/{app}"
    before = ingress_metrics(base)["server_failovers_total"]
    prompts = [f"stream {i}: abcdefghij" for i in range(8)] + [f"unary {i}: klmnopqrst" for i in range(8)]
    bodies = [{"prompt": p, "max_tokens": MAX_TOKENS, "ignore_eos": True} for p in prompts]
    results, health = run_and_kill(base_url, f"/{app}", app, bodies[:8], bodies[8:], replicas,
                                   submissions=submissions)
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
            body = {"prompt": "abcdefghij", "max_tokens": MAX_TOKENS, "ignore_eos": True}
            task = asyncio.create_task(stream_one(client, "/gone", body, seen))
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

"""Live replica autoscaling on the replicas' own signals (record_autoscaling_stats -> the BATON policy):
sustained load takes the deployment from 1 to 2 replicas, idleness brings it back to 1. Fake engine, short
delays, bounded waits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from ray import serve

from configs import EngineConfig
from configs.serve import ServerConfig
from deployments.builder import make_app
from tests.deployments.serve_testing import fake_factory, wait_until

AUTOSCALING: dict[str, Any] = {
    "min_replicas": 1,
    "max_replicas": 2,
    "initial_replicas": 1,
    "upscale_delay_s": 1,
    "downscale_delay_s": 2,
    "look_back_period_s": 1,
    "metrics_interval_s": 0.2,
    # Ray's default rule (ongoing requests / target) would never scale out at this target: the scale-out
    # below can only come from the BATON policy reading the engine's rows and queue.
    "target_ongoing_requests": 1000,
    "policy": {
        "policy_function": "autoscaler.serve_policy:BatonReplicaPolicy",
        "policy_kwargs": {"target_utilisation": 0.8, "downscale_utilisation": 0.5},
    },
}


@pytest.fixture(scope="module")
def base_url(serve_instance: str) -> Iterator[str]:
    options = {
        "autoscaling_config": AUTOSCALING,
        "max_ongoing_requests": 16,
        "ray_actor_options": {"num_cpus": 0.5},
    }
    engine = EngineConfig(model="fake", max_batch_size=2, max_model_len=4096)
    serve.run(
        make_app(engine, ServerConfig(), fake_factory(step_delay_s=0.01), engine_options=options),
        name="auto",
    )
    yield serve_instance


def running_replicas() -> int:
    status = serve.status().applications["auto"].deployments["BatonEngine"]
    return int(status.replica_states.get("RUNNING", 0))


def test_sustained_load_scales_out_and_idleness_scales_back(base_url: str) -> None:
    assert running_replicas() == 1
    stop = threading.Event()
    answered = [0]

    async def load() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:

            async def worker() -> None:
                while not stop.is_set():
                    body = {"prompt": "load", "max_tokens": 50, "ignore_eos": True}
                    r = await client.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    answered[0] += 1

            await asyncio.gather(*(worker() for _ in range(8)))  # 8 requests for 2 rows: a standing queue

    loader = threading.Thread(target=lambda: asyncio.run(load()), daemon=True)
    loader.start()
    try:
        wait_until(
            lambda: running_replicas() == 2, timeout_s=60, interval_s=0.5, what="scale out to 2 replicas"
        )
    finally:
        stop.set()
        loader.join(timeout=30)
    assert not loader.is_alive() and answered[0] > 0
    wait_until(lambda: running_replicas() == 1, timeout_s=60, interval_s=0.5, what="scale back to 1 replica")
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": "still", "max_tokens": 5}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "still"

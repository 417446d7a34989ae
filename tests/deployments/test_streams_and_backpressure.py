"""Streams that end early and load beyond the limits, on real Ray Serve over the fake engine.

* 20 HTTP clients drop mid-stream: every request leaves the engine (running count back to 0) at once.
* A handle stream cancelled by its caller: the same.
* A burst past the replica's own limit (server.max_pending_requests): the excess gets an OpenAI-shaped 429
  with Retry-After (what serve_config.yaml's defaults give), the rest full answers, and nothing hangs.
* A burst past Ray's max_ongoing_requests + max_queued_requests (the app limit set higher): Ray's proxy
  refuses the excess itself, 429 or 503 with Retry-After and a plain-text body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from ray import serve
from ray.serve import RunTarget

from configs import EngineConfig
from configs.serve import ServerConfig
from deployments.builder import make_app
from deployments.handle import BatonClient
from deployments.protocol import CompletionRequest
from tests.deployments.serve_testing import fake_factory, wait_until

ENGINE = EngineConfig(model="fake", max_batch_size=32, max_model_len=8192)
STEP_S = 0.01


@pytest.fixture(scope="module")
def base_url(serve_instance: str) -> Iterator[str]:
    targets = [RunTarget(make_app(ENGINE, ServerConfig(), fake_factory(step_delay_s=STEP_S)), "baton", "/")]
    # Ray's proxy limits (the app's own limit, 24 by default, is above them here). BatonIngress's default
    # answers 429 (serve_config.yaml too); Ray's default is 503.
    options: dict[str, Any] = {"max_ongoing_requests": 2, "max_queued_requests": 2}
    options["backpressure_config"] = {"status_code": 503, "retry_after_s": 2}
    app = make_app(ENGINE, ServerConfig(), fake_factory(step_delay_s=STEP_S), ingress_options=options)
    targets.append(RunTarget(app, "bp503", "/bp503"))
    options["backpressure_config"] = {"status_code": 429, "retry_after_s": 2}
    app = make_app(ENGINE, ServerConfig(), fake_factory(step_delay_s=STEP_S), ingress_options=options)
    targets.append(RunTarget(app, "bp429", "/bp429"))
    options = {"max_ongoing_requests": 16, "max_queued_requests": 16}
    app = make_app(
        ENGINE,
        ServerConfig(max_pending_requests=3, retry_after_s=3),
        fake_factory(step_delay_s=STEP_S),
        ingress_options=options,
    )
    targets.append(RunTarget(app, "applimit", "/applimit"))
    serve.run_many(targets)
    yield serve_instance


def engine_metrics(app: str = "baton") -> dict[str, float]:
    return dict(serve.get_app_handle(app).engine_status.remote().result().metrics)


def idle(app: str = "baton") -> bool:
    m = engine_metrics(app)
    return m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0


def test_http_clients_dropping_mid_stream_abort_their_requests(base_url: str) -> None:
    n_clients = 20
    body = {"prompt": "abcdefgh", "max_tokens": 5000, "ignore_eos": True, "stream": True}

    async def client_that_leaves(i: int) -> int:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: ")
                    if seen >= 3 + i % 5:
                        break  # leave mid-stream: the connection closes with the body unread
            return seen

    async def run() -> list[int]:
        return await asyncio.gather(*(client_that_leaves(i) for i in range(n_clients)))

    seen = asyncio.run(run())
    assert all(s >= 3 for s in seen)
    left_at = time.monotonic()
    wait_until(idle, timeout_s=10, what="running + waiting back to 0 after the disconnects")
    took = time.monotonic() - left_at
    # 5000 tokens at 10 ms would take 50 s: the requests were aborted, not run to completion.
    assert took < 5, took
    tokens = engine_metrics()["generated_tokens_total"]
    time.sleep(0.2)
    assert engine_metrics()["generated_tokens_total"] == tokens  # nothing is generating any more


def test_handle_stream_cancelled_by_the_caller(base_url: str) -> None:
    handle = serve.get_app_handle("baton").options(stream=True)
    request = CompletionRequest(prompt="xyz", max_tokens=5000, ignore_eos=True)
    gen = handle.generate_stream.remote(request)
    chunks = []
    for chunk in gen:
        chunks.append(chunk)
        if len(chunks) == 3:
            break
    gen.cancel()
    wait_until(idle, timeout_s=5, what="the cancelled handle stream to leave the engine")

    async def leave_early() -> str:
        client = BatonClient(serve.get_app_handle("baton"))
        text = ""
        async for chunk in client.stream(request):
            text += chunk.choices[0].text if chunk.choices else ""  # type: ignore[union-attr]
            if len(text) >= 4:
                break
        return text

    assert asyncio.run(leave_early()).startswith("xyzx")
    wait_until(idle, timeout_s=5, what="BatonClient.stream left early")


@pytest.mark.parametrize("app", ["bp429", "bp503"])
def test_burst_beyond_the_queue_limit_is_refused_with_retry_after(base_url: str, app: str) -> None:
    """max_ongoing_requests=2 + max_queued_requests=2: of 12 simultaneous requests some are refused at once
    (with Retry-After), the accepted ones get complete answers, and the whole burst ends quickly."""
    status = int(app.removeprefix("bp"))
    prompt = "burst"
    body = {"prompt": prompt, "max_tokens": 40, "ignore_eos": True}
    expected = (prompt * 10)[:40]

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(f"/{app}/v1/completions", json=body)

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            return await asyncio.gather(*(one(client) for _ in range(12)))

    t0 = time.monotonic()
    responses = asyncio.run(run())
    elapsed = time.monotonic() - t0
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert refused, "the burst should exceed the limits"
    assert len(ok) >= 2, [r.status_code for r in responses]  # at least max_ongoing_requests
    for r in refused:
        assert r.status_code == status, r.text
        assert r.headers["retry-after"] == "2"
        assert "backpressure" in r.text
    for r in ok:
        assert r.json()["choices"][0]["text"] == expected
    assert elapsed < 20, elapsed
    wait_until(lambda: idle(app), timeout_s=5, what="the burst to drain")
    # After the burst, the deployment serves normally again.
    assert (
        httpx.post(f"{base_url}/{app}/v1/completions", json={"prompt": "ok"}, timeout=10).status_code == 200
    )


def test_burst_beyond_the_replica_limit_gets_openai_shaped_429(base_url: str) -> None:
    """server.max_pending_requests=3 (below Ray's limits): of 12 simultaneous requests, 9 are refused at once
    with an OpenAI error body and Retry-After, the 3 accepted ones complete, and the server serves after."""
    body = {"prompt": "limit", "max_tokens": 40, "ignore_eos": True}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            return await asyncio.gather(
                *(client.post("/applimit/v1/completions", json=body) for _ in range(12))
            )

    responses = asyncio.run(run())
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(ok) == 3 and len(refused) == 9, [r.status_code for r in responses]
    for r in refused:
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
        assert r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "server_overloaded"
        assert "3 requests in progress" in err["message"]
    for r in ok:
        assert r.json()["choices"][0]["text"] == ("limit" * 8)[:40]
    status = serve.get_app_handle("applimit").engine_status.remote().result().metrics
    assert status["server_requests_in_flight"] == 0 and status["server_requests_refused_total"] == 9

    # The openai client sees a RateLimitError carrying the same error fields.
    results = openai_burst(f"{base_url}/applimit/v1", 8)
    limited = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert len(limited) == 5 and all(e.code == "server_overloaded" for e in limited)
    assert (
        httpx.post(f"{base_url}/applimit/v1/completions", json={"prompt": "ok"}, timeout=10).status_code
        == 200
    )


def openai_burst(base_url: str, n: int) -> list[Any]:
    """n simultaneous openai-client completions (no retries): each a response or the RateLimitError."""

    async def run() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=30)

        async def one() -> Any:
            try:
                return await client.completions.create(
                    model="fake", prompt="rl", max_tokens=30, extra_body={"ignore_eos": True}
                )
            except openai.RateLimitError as e:
                return e

        try:
            return await asyncio.gather(*(one() for _ in range(n)))
        finally:
            await client.close()

    return asyncio.run(run())


def test_openai_client_sees_rate_limit_error(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/bp429/v1", api_key="x", max_retries=0, timeout=30)
    results = openai_burst(f"{base_url}/bp429/v1", 10)
    errors = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert errors and all(e.status_code == 429 for e in errors)
    assert len(results) - len(errors) >= 2
    wait_until(lambda: idle("bp429"), timeout_s=5, what="drain")
    assert client.completions.create(model="fake", prompt="ok", max_tokens=2).choices[0].text == "ok"

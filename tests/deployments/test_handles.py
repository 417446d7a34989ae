"""Python handles, a second Ray app calling the engine, live reconfigure, and health checks, on real Ray
Serve over the fake engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from ray import serve
from ray.serve import RunTarget

from configs import EngineConfig
from configs.serve import ServerConfig
from deployments.builder import make_app
from deployments.errors import OpenAIError
from deployments.examples.pipeline import PipelineRequest, PipelineResponse, build_pipeline
from deployments.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from tests.deployments.serve_testing import fake_factory, wait_until

ENGINE = EngineConfig(model="fake", max_batch_size=4, max_model_len=4096)
KNOBS: dict[str, Any] = {"max_batch_size": 3, "high_watermark": 0.8}


def _baton(user_config: dict[str, Any], **options: Any) -> Any:
    options["user_config"] = user_config
    return make_app(ENGINE, ServerConfig(), fake_factory(), engine_options=options)


def _crashy() -> Any:
    options = {"health_check_period_s": 1, "health_check_timeout_s": 5}
    return make_app(ENGINE, ServerConfig(), fake_factory(crash_on_prompt="CRASH"), engine_options=options)


@pytest.fixture(scope="module")
def base_url(serve_instance: str) -> Iterator[str]:
    serve.run_many(
        [
            RunTarget(_baton(KNOBS), "baton", "/"),
            RunTarget(
                build_pipeline({"engine_app": "baton", "answer_max_tokens": 80}), "pipeline", "/pipeline"
            ),
            RunTarget(_crashy(), "crashy", "/crashy"),
        ]
    )
    yield serve_instance


# --- handle API -------------------------------------------------------------------------------------------


def test_unary_handle_returns_typed_responses(base_url: str) -> None:
    handle = serve.get_app_handle("baton")
    out = handle.generate.remote(CompletionRequest(prompt="abc", max_tokens=10)).result()
    assert isinstance(out, CompletionResponse)
    assert out.choices[0].text == "abc" and out.choices[0].finish_reason == "stop"
    chat = handle.generate.remote(
        ChatCompletionRequest(messages=[ChatMessage(role="user", content="q")], max_tokens=3, priority=2)
    ).result()
    assert isinstance(chat, ChatCompletionResponse) and chat.choices[0].message.content == "<us"
    as_dict = handle.generate.remote({"prompt": "zz", "max_tokens": 2}).result()  # plain dicts work too
    assert isinstance(as_dict, CompletionResponse) and as_dict.choices[0].text == "zz"


def test_streaming_handle_yields_typed_chunks(base_url: str) -> None:
    handle = serve.get_app_handle("baton").options(stream=True)
    chunks = list(handle.generate_stream.remote(CompletionRequest(prompt="hey", max_tokens=9)))
    assert all(isinstance(c, CompletionStreamResponse) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == "hey"
    assert chunks[-1].choices[0].finish_reason == "stop"
    chat = list(
        handle.generate_stream.remote(
            ChatCompletionRequest(messages=[ChatMessage(role="user", content="q")], max_tokens=4)
        )
    )
    assert all(isinstance(c, ChatCompletionChunk) for c in chat)
    assert "".join(c.choices[0].delta.content or "" for c in chat) == "<use"


def test_handle_errors_are_openai_errors(base_url: str) -> None:
    handle = serve.get_app_handle("baton")
    with pytest.raises(OpenAIError) as e:
        handle.generate.remote({"prompt": "x", "n": 17}).result()
    assert e.value.status_code == 400 and e.value.param == "n"
    with pytest.raises(OpenAIError) as e:
        handle.generate.remote(CompletionRequest(prompt="x", model="other")).result()
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(OpenAIError) as e:
        list(handle.options(stream=True).generate_stream.remote({"prompt": "x" * 5000}))
    assert e.value.status_code == 400 and e.value.param == "prompt"
    assert handle.generate.remote({"prompt": "ok", "max_tokens": 2}).result().choices[0].text == "ok"


def test_second_app_calls_the_engine_through_a_handle(base_url: str) -> None:
    pipeline = serve.get_app_handle("pipeline")
    result = pipeline.run.remote(PipelineRequest(document="The cat sat.", question="Where?")).result()
    assert isinstance(result, PipelineResponse)
    # The fake engine echoes its (templated) prompt, so each step shows what it was asked.
    assert result.summary.startswith("<system>Summarise")
    assert result.answer.startswith("<system>Answer using this summary: <system>Summarise")
    assert result.answer_chunks > 1 and result.completion_tokens > 0
    r = httpx.post(f"{base_url}/pipeline", json={"document": "d", "question": "q"}, timeout=30)
    assert r.status_code == 200 and r.json()["answer"]
    bad = httpx.post(f"{base_url}/pipeline", json={"document": "d"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "question"


# --- reconfigure: user_config knobs reach the engine -------------------------------------------------
# (In-place reconfigure of a running replica by `serve deploy` is tested in test_serve_cli.py: an imperative
# `serve.run` always starts new replicas.)


def test_user_config_reaches_the_engine(base_url: str) -> None:
    handle = serve.get_app_handle("baton")
    before = handle.engine_status.remote().result()
    assert before.config["max_batch_size"] == 3
    assert before.config["controller"]["high_watermark"] == 0.8

    new_knobs = {
        "max_batch_size": 2,
        "low_watermark": 0.5,
        "preemption_mode": "swap",
        "prefill_token_budget": 64,
    }
    serve.run(_baton(new_knobs), name="baton", route_prefix="/")
    after = handle.engine_status.remote().result()
    assert after.config["max_batch_size"] == 2 and after.config["prefill_token_budget"] == 64
    assert after.config["controller"]["low_watermark"] == 0.5
    assert after.config["controller"]["preemption_mode"] == "swap"
    assert after.metrics["max_batch_size"] == 2
    assert httpx.get(f"{base_url}/stats", timeout=10).json()["config"]["max_batch_size"] == 2


def test_bad_user_config_fails_the_deploy_naming_the_knob(base_url: str) -> None:
    # (Every other bad knob is covered without Ray in test_config.py.)
    with pytest.raises(RuntimeError, match="Deploying application baton-bad failed"):
        serve.run(
            _baton({"max_rows": 3}, max_constructor_retry_count=1), name="baton-bad", route_prefix="/bad"
        )
    try:
        message = serve.status().applications["baton-bad"].deployments["BatonEngine"].message
        assert "max_rows" in message, message
    finally:
        serve.delete("baton-bad")


# --- health -----------------------------------------------------------------------------------------------


def test_dead_engine_loop_fails_health_and_the_replica_is_replaced(base_url: str) -> None:
    """A request that kills every engine it reaches (the fake's loop dies on "CRASH"): each replica's dead
    loop fails Serve's health check and is replaced; the request is given up with a 503 after
    `max_failovers` (3) replicas died under it, and a stream that shared those replicas continues on each
    replacement, exactly, to its end."""
    url = f"{base_url}/crashy"
    handle = serve.get_app_handle("crashy")
    replica = handle.engine_status.remote().result().replica
    with httpx.Client(base_url=url, timeout=120) as client:
        with client.stream(
            "POST",
            "/v1/completions",
            json={"prompt": "abc", "max_tokens": 3000, "ignore_eos": True, "stream": True},
        ) as stream:
            lines = stream.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            crash = client.post("/v1/completions", json={"prompt": "CRASH"})
            assert crash.status_code == 503, crash.text
            assert "died 4 times before it made progress" in crash.json()["error"]["message"]
            rest = [first] + [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in rest)
        events = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
        text = "".join(c["text"] for e in events for c in e["choices"])
        assert text == ("abc" * 1000)[:3000]  # nothing lost, nothing repeated across three replacements
    # check_health() raises, so Serve replaces the replica; the app serves again.
    wait_until(
        lambda: handle.engine_status.remote().result().replica != replica,
        timeout_s=60,
        what="replica replaced",
    )
    wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, timeout_s=30, what="healthy")
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=10)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"

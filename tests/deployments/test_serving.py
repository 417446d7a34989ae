"""OpenAIServing and Generation without Ray: the request -> engine -> response path over the fake front,
and the guarantees that no request outlives its consumer and no consumer outlives the engine."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from configs import EngineConfig
from configs.errors import FieldError
from configs.serve import ServerConfig
from deployments import metrics, serving
from deployments.errors import OpenAIError
from deployments.metrics import AutoscalingSignals
from deployments.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, CompletionResponse
from deployments.serving import OpenAIServing, RequestTiming
from engine.request import RequestOutput, Usage
from tests.deployments.fake_engine import FakeAsyncEngine


def idle(front: FakeAsyncEngine) -> bool:
    m = front.metrics()
    return m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0


async def settle(front: FakeAsyncEngine, timeout_s: float = 2.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if idle(front):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {front.metrics()}")


LONG = CompletionRequest(prompt="abc", max_tokens=400, ignore_eos=True)


def test_unary_and_stream_and_timings(front: FakeAsyncEngine) -> None:
    timings: list[RequestTiming] = []
    ttfts: list[float] = []
    s = OpenAIServing(front, ServerConfig(), timings.append, ttfts.append)

    async def run() -> None:
        out = await s.generate(CompletionRequest(prompt="hello", max_tokens=3))
        assert isinstance(out, CompletionResponse) and out.choices[0].text == "hel"
        chunks = [c async for c in await s.generate_stream(CompletionRequest(prompt="hi", max_tokens=9))]
        assert "".join(c.choices[0].text for c in chunks) == "hi"  # type: ignore[union-attr]

    asyncio.run(run())
    assert [t.finish_reason for t in timings] == ["length", "stop"]
    assert len(ttfts) == 2 and all(t.ttft_s is not None and t.e2e_s >= t.ttft_s for t in timings)
    assert timings[0].tpot_s is not None and timings[0].tpot_s > 0


def test_chat_default_max_tokens_is_capped_by_the_context(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig(default_max_tokens=10_000))
    prompt = "x" * 400  # the template adds ~20 characters; 512 - 420 remain

    async def run() -> Any:
        return await s.generate(ChatCompletionRequest(messages=[ChatMessage(role="user", content=prompt)]))

    out = asyncio.run(run())
    assert out.usage is not None and out.usage.prompt_tokens + out.usage.completion_tokens <= 512


def test_consumer_leaving_early_aborts(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig())

    async def run() -> None:
        stream = await s.generate_stream(LONG)
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        await settle(front)

    asyncio.run(run())


def test_cancelled_consumer_aborts(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig())

    async def run() -> None:
        task = asyncio.create_task(s.generate(LONG))
        await asyncio.sleep(0.05)
        assert not idle(front)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await settle(front)

    asyncio.run(run())


def test_stream_dropped_before_it_starts_aborts(front: FakeAsyncEngine) -> None:
    """A client gone before the first chunk: the stream is never iterated, only garbage-collected."""
    s = OpenAIServing(front, ServerConfig())

    async def run() -> None:
        stream: AsyncIterator[Any] | None = await s.generate_stream(LONG)
        await asyncio.sleep(0.05)
        assert not idle(front)
        del stream
        gc.collect()
        await settle(front)

    asyncio.run(run())


def test_admission_limit_refuses_with_an_openai_429_and_every_exit_frees_its_slot(
    front: FakeAsyncEngine,
) -> None:
    """max_pending_requests=3: the 4th request is a 429 (rate_limit_error, Retry-After) raised before the
    engine sees it; a finished, an abandoned, a cancelled and an invalid request each give their slot back."""
    s = OpenAIServing(front, ServerConfig(max_pending_requests=3, retry_after_s=7))

    async def run() -> None:
        held = [await s.generate_stream(LONG) for _ in range(3)]
        with pytest.raises(OpenAIError) as refused:
            await s.generate_stream(LONG)
        err = refused.value
        assert (err.status_code, err.type, err.code) == (429, "rate_limit_error", "server_overloaded")
        assert err.headers == {"Retry-After": "7"} and "3 requests in progress" in err.message
        assert s.admission.in_flight == 3 and s.admission.refused == 1
        with pytest.raises(OpenAIError, match="429"):
            await s.generate(CompletionRequest(prompt="x", max_tokens=1))

        # 1) consumer leaves early; 2) stream garbage-collected unstarted; 3) unary call cancelled.
        async for _ in held[0]:
            break
        await held[0].aclose()  # type: ignore[attr-defined]
        assert s.admission.in_flight == 2
        held[1] = None  # type: ignore[call-overload]
        gc.collect()
        assert s.admission.in_flight == 1
        task = asyncio.create_task(s.generate(LONG))
        await asyncio.sleep(0.02)
        assert s.admission.in_flight == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert s.admission.in_flight == 1
        # 4) a request the engine rejects (longer than the context) does not keep a slot.
        with pytest.raises(OpenAIError, match="400"):
            await s.generate_stream(CompletionRequest(prompt="y" * 600, max_tokens=2))
        assert s.admission.in_flight == 1
        # 5) a request that runs to the end.
        out = await s.generate(CompletionRequest(prompt="hello", max_tokens=3))
        assert isinstance(out, CompletionResponse)
        assert s.admission.in_flight == 1  # only held[2] is left
        await held[2].aclose()  # type: ignore[attr-defined]
        assert s.admission.in_flight == 0
        await settle(front)

    asyncio.run(run())


def test_admission_limit_off() -> None:
    assert ServerConfig(max_pending_requests=None).max_pending_requests is None
    admission = serving.Admission(None, 2)
    releases = [admission.acquire() for _ in range(1000)]
    assert admission.in_flight == 1000
    for release in releases:
        release()
        release()  # idempotent
    assert admission.in_flight == 0 and admission.refused == 0


def test_engine_dying_mid_request_fails_it_instead_of_hanging(front: FakeAsyncEngine) -> None:
    """The dying loop ends the open stream (no polling here): a 503, since another replica can serve it."""
    s = OpenAIServing(front, ServerConfig())

    async def run() -> None:
        task = asyncio.create_task(s.generate(LONG))
        await asyncio.sleep(0.05)
        front.crash()
        with pytest.raises(OpenAIError) as e:
            await asyncio.wait_for(task, timeout=5)
        assert e.value.status_code == 503 and "loop died" in e.value.message
        assert s.admission.in_flight == 0  # the failed request gave its slot back
        with pytest.raises(OpenAIError) as e:  # and new requests are refused, not queued forever
            await s.generate(CompletionRequest(prompt="x"))
        assert e.value.status_code == 503
        assert s.admission.in_flight == 0

    asyncio.run(run())


def test_a_bad_value_is_a_400_naming_the_field_the_engine_gave(
    front: FakeAsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`param` is FieldError.param, whatever the message says (the fake's context message does not start
    with the field's name); the engine's prompt is the chat request's messages."""
    s = OpenAIServing(front, ServerConfig())
    too_long = "y" * 600

    async def refused(request: Any) -> OpenAIError:
        with pytest.raises(OpenAIError) as e:
            await s.generate_stream(request)
        return e.value

    err = asyncio.run(refused(CompletionRequest(prompt=too_long, max_tokens=2)))
    assert (err.status_code, err.param) == (400, "prompt") and "max_model_len" in err.message
    err = asyncio.run(refused(ChatCompletionRequest(messages=[ChatMessage(role="user", content=too_long)],
                                                    max_tokens=2)))
    assert (err.status_code, err.param) == (400, "messages")

    def submit(*args: Any, **kwargs: Any) -> Any:
        raise FieldError("priority", "lower values are more urgent; this one is out of range")

    monkeypatch.setattr(front, "submit", submit)
    err = asyncio.run(refused(CompletionRequest(prompt="x", max_tokens=2)))
    assert (err.status_code, err.param) == (400, "priority")
    assert s.admission.in_flight == 0


def test_engine_gauges_say_what_they_measure() -> None:
    assert metrics._GAUGES["baton_kv_cache_usage_perc"][0] == "kv_cache_usage"
    assert metrics._GAUGES["baton_memory_used_fraction"][0] == "memory_used_fraction"
    fake_keys = set(FakeAsyncEngine(EngineConfig(model="fake")).metrics())
    assert {key for key, _ in metrics._GAUGES.values()} <= fake_keys  # every gauge has its engine value


class ScriptedStream:
    """A stream that yields given outputs (engine failure modes the fake does not produce)."""

    def __init__(self, outs: list[RequestOutput]) -> None:
        self._outs = list(outs)

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._outs:
            raise StopAsyncIteration
        return self._outs.pop(0)

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize(
    ("final", "status"),
    [
        (RequestOutput("r", [], "", True, "error", Usage(1, 1), "device fault"), 500),
        (RequestOutput("r", [], "", True, "abort", Usage(1, 1)), 503),
        (None, 503),  # the stream ended without a final output
    ],
)
def test_engine_side_failures_are_5xx(
    front: FakeAsyncEngine, monkeypatch: pytest.MonkeyPatch, final: RequestOutput | None, status: int
) -> None:
    outs = [RequestOutput("r", [97], "a")] + ([final] if final else [])
    monkeypatch.setattr(front, "submit", lambda *a, **k: ScriptedStream(outs))
    s = OpenAIServing(front, ServerConfig())
    with pytest.raises(OpenAIError) as e:
        asyncio.run(s.generate(CompletionRequest(prompt="x")))  # type: ignore[arg-type]
    assert e.value.status_code == status
    if final is not None and final.error:
        assert "device fault" in e.value.message


def test_autoscaling_signals() -> None:
    now = [100.0]
    signals = AutoscalingSignals(clock=lambda: now[0])
    base = {
        "num_requests_running": 3,
        "num_requests_waiting": 5,
        "max_batch_size": 8,
        "preemptions_total": 10,
    }
    first = signals.report(base)
    assert first["baton_running"] == 3 and first["baton_waiting"] == 5 and first["baton_max_batch_size"] == 8
    assert first["baton_preemptions_per_s"] == 0 and first["baton_ttft_s"] == 0
    signals.observe_ttft(0.2)
    signals.observe_ttft(0.4)
    now[0] += 2
    second = signals.report({**base, "preemptions_total": 14})
    assert second["baton_preemptions_per_s"] == pytest.approx(2.0)
    assert second["baton_ttft_s"] == pytest.approx(0.3)
    assert all(isinstance(v, float) for v in second.values())  # Serve rejects anything but numbers


def test_tokenize_and_detokenize_run_off_the_event_loop(front: FakeAsyncEngine, monkeypatch) -> None:
    from deployments.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

    threads: list[int] = []
    tokenizer = front.engine.tokenizer
    def recorded(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.get_ident())
            return real(*args, **kwargs)
        return call

    for name in ("encode", "decode"):
        monkeypatch.setattr(tokenizer, name, recorded(getattr(tokenizer, name)))
    s = OpenAIServing(front, ServerConfig())

    async def run() -> int:
        assert (await s.tokenize(TokenizeCompletionRequest(prompt="ab"))).tokens == [97, 98]
        chat = await s.tokenize(TokenizeChatRequest(messages=[ChatMessage(role="user", content="x")]))
        assert chat.count == len("<user>x\n<assistant>")
        assert (await s.detokenize(DetokenizeRequest(tokens=[104, 105]))).prompt == "hi"
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert len(threads) == 3 and loop_thread not in threads


def test_a_client_request_id_is_the_engines_logged_and_a_running_one_is_a_409(front: FakeAsyncEngine) -> None:
    import logging

    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("ray.serve")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    s = OpenAIServing(front, ServerConfig())

    async def run() -> None:
        held = await s.generate_stream(LONG, "client-42")
        with pytest.raises(OpenAIError) as e:
            await s.generate(CompletionRequest(prompt="x"), "client-42")
        assert e.value.status_code == 409 and e.value.param == "X-Request-Id"
        await anext(held)  # type: ignore[call-overload]
        await held.aclose()  # type: ignore[attr-defined]
        out = await s.generate(CompletionRequest(prompt="ok", max_tokens=2), "client-42")  # free again
        assert out.id == "client-42" and out.choices[0].text == "ok"  # type: ignore[union-attr]

    try:
        asyncio.run(run())
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    about = [r for r in records if "client-42" in r]
    assert any("prompt tokens" in r for r in about) and any("finished" in r for r in about), records


# --- per-request deadline: `timeout`, capped by the server's request_timeout_s ------------------------------

ENDLESS = {"prompt": "abc", "max_tokens": 400, "ignore_eos": True}  # 400 fake steps of 2 ms: ~1 s or more


@pytest.mark.parametrize("request_timeout, server_timeout", [(0.15, None), (None, 0.15), (5.0, 0.15)])
def test_a_request_past_its_deadline_ends_as_length_with_a_warning(
    front: FakeAsyncEngine, request_timeout: float | None, server_timeout: float | None
) -> None:
    s = OpenAIServing(front, ServerConfig(request_timeout_s=server_timeout))

    async def run() -> None:
        out = await s.generate(CompletionRequest.model_validate({**ENDLESS, "timeout": request_timeout}))
        choice = out.choices[0]
        assert choice.finish_reason == "length" and out.warning is not None and "0.15 s" in out.warning
        assert out.usage is not None and 0 < out.usage.completion_tokens < 400
        assert len(choice.text) == out.usage.completion_tokens  # the fake: one character per token
        assert "warning" in out.model_dump()
        await settle(front)  # the engine's request was aborted, not left running
        assert s.admission.in_flight == 0

        chunks = [c async for c in await s.generate_stream(
            ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 400, "ignore_eos": True,
                                                  "timeout": request_timeout}))]
        last = chunks[-1]
        assert last.choices[0].finish_reason == "length" and last.warning is not None
        assert all(c.warning is None for c in chunks[:-1])
        await settle(front)
        assert s.admission.in_flight == 0

    asyncio.run(run())


def test_a_request_within_its_deadline_has_no_warning(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig(request_timeout_s=30))
    out = asyncio.run(s.generate(CompletionRequest(prompt="hello", max_tokens=3, timeout=20)))
    assert out.choices[0].text == "hel" and out.warning is None and "warning" not in out.model_dump()


@pytest.mark.parametrize("bad", [0, -1, "5", True])
def test_a_bad_timeout_is_a_400_naming_it(bad: Any) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate({**ENDLESS, "timeout": bad})
    assert e.value.errors()[0]["loc"] == ("timeout",)

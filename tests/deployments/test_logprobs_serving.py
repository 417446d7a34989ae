"""Logprobs in OpenAI's two shapes through the in-process serving layer (the fake engine's logprobs: each token
log(1/2), alternatives t, t+1, ... with log(1/2), log(1/4), ...; see fake_engine.py)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from configs.serve import ServerConfig
from deployments.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from deployments.serving import OpenAIServing
from tests.deployments.fake_engine import FakeAsyncEngine

HALF = math.log(0.5)


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[ChatMessage(role="user", content="hi")], **fields)


def test_completion_logprobs_unary_and_streamed(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig())

    async def run() -> tuple[CompletionResponse, list[CompletionStreamResponse]]:
        out = await s.generate(CompletionRequest(prompt="abcd", max_tokens=3, logprobs=2))
        stream = await s.generate_stream(CompletionRequest(prompt="abcd", max_tokens=9, logprobs=2, stream=True))
        return out, [c async for c in stream]  # type: ignore[misc]

    out, chunks = asyncio.run(run())
    lp = out.choices[0].logprobs
    assert lp is not None and out.choices[0].text == "abc"
    assert lp.tokens == ["a", "b", "c"] and lp.token_logprobs == pytest.approx([HALF] * 3)
    assert lp.top_logprobs == [{"a": pytest.approx(HALF), "b": pytest.approx(2 * HALF)},
                               {"b": pytest.approx(HALF), "c": pytest.approx(2 * HALF)},
                               {"c": pytest.approx(HALF), "d": pytest.approx(2 * HALF)}]
    assert lp.text_offset == [0, 1, 2]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for x in streamed for t in x.tokens] == ["a", "b", "c", "d", ""]  # "": the EOS, counted in usage
    assert [o for x in streamed for o in x.text_offset] == [0, 1, 2, 3, 4]  # offsets run on across chunks
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "abcd"


def test_chat_logprobs_unary_and_streamed_agree(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig())

    async def run() -> tuple[ChatCompletionResponse, list[ChatCompletionChunk]]:
        out = await s.generate(chat(max_tokens=5, logprobs=True, top_logprobs=3))
        stream = await s.generate_stream(chat(max_tokens=5, logprobs=True, top_logprobs=3, stream=True))
        return out, [c async for c in stream]  # type: ignore[misc]

    out, chunks = asyncio.run(run())
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == out.usage.completion_tokens == 5  # type: ignore[union-attr]
    assert "".join(c.token for c in content) == out.choices[0].message.content == "<user"
    for c in content:
        assert c.bytes == list(c.token.encode()) and c.logprob == pytest.approx(HALF)
        values = [t.logprob for t in c.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True) and sum(map(math.exp, values)) <= 1
        assert c.top_logprobs[0].token == c.token
    shaped = [ch.choices[0].logprobs for ch in chunks if ch.choices and ch.choices[0].logprobs]
    streamed = [x for lp in shaped for x in lp.content or []]
    assert [x.model_dump() for x in streamed] == [x.model_dump() for x in content]


def test_logprobs_true_without_top_gives_no_alternatives_and_none_when_not_asked(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig())

    async def run() -> tuple[Any, Any, Any]:
        return (await s.generate(chat(max_tokens=2, logprobs=True)), await s.generate(chat(max_tokens=2)),
                await s.generate(CompletionRequest(prompt="ab", max_tokens=2, logprobs=0)))

    bare, plain, zero = asyncio.run(run())
    assert [c.top_logprobs for c in bare.choices[0].logprobs.content] == [[], []]
    assert plain.choices[0].logprobs is None
    assert zero.choices[0].logprobs.top_logprobs == [{}, {}] and zero.choices[0].logprobs.tokens == ["a", "b"]


@pytest.mark.parametrize(("body", "param"), [
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": -1, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"top_logprobs": 2, "logprobs": False}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
])
def test_bad_chat_logprobs_name_the_field(body: dict[str, Any], param: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **body})
    assert e.value.errors()[0]["loc"][0] == param

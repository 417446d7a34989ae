"""Completions' echo through the in-process serving layer, over the fake engine (tokens are characters; each
token's logprob log(1/2), alternatives t, t+1, ... at log(1/2), log(1/4), ...; see fake_engine.py)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from pydantic import ValidationError

from configs.serve import ServerConfig
from deployments.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from deployments.serving import OpenAIServing
from tests.deployments.fake_engine import FakeAsyncEngine

HALF = math.log(0.5)


def complete(front: FakeAsyncEngine, **fields: Any) -> tuple[CompletionResponse, list[CompletionStreamResponse]]:
    s = OpenAIServing(front, ServerConfig())

    async def run() -> tuple[CompletionResponse, list[CompletionStreamResponse]]:
        out = await s.generate(CompletionRequest(**fields))
        stream = await s.generate_stream(CompletionRequest(**fields, stream=True,
                                                           stream_options={"include_usage": True}))
        return out, [c async for c in stream]  # type: ignore[misc]

    out, chunks = asyncio.run(run())
    assert isinstance(out, CompletionResponse)
    return out, chunks


def streamed_text(chunks: list[CompletionStreamResponse]) -> str:
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_echo_puts_the_prompt_before_the_completion(front: FakeAsyncEngine) -> None:
    out, chunks = complete(front, prompt="abc", max_tokens=2, echo=True)
    assert out.choices[0].text == "abcab" and out.choices[0].logprobs is None
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 2)
    assert chunks[0].choices[0].text.startswith("abc"), "the first chunk carries the prompt"
    assert streamed_text(chunks) == "abcab"


def test_echo_of_token_ids_is_their_text(front: FakeAsyncEngine) -> None:
    out, _ = complete(front, prompt=[ord("x"), ord("y")], max_tokens=1, echo=True)
    assert out.choices[0].text == "xyx"


def test_echo_with_logprobs_lists_the_prompt_tokens_first(front: FakeAsyncEngine) -> None:
    out, chunks = complete(front, prompt="abc", max_tokens=2, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert lp is not None
    assert lp.tokens == ["a", "b", "c", "a", "b"]
    assert lp.token_logprobs == [None, pytest.approx(HALF), pytest.approx(HALF), pytest.approx(HALF),
                                 pytest.approx(HALF)]
    assert lp.top_logprobs == [None, {"b": pytest.approx(HALF)}, {"c": pytest.approx(HALF)},
                               {"a": pytest.approx(HALF)}, {"b": pytest.approx(HALF)}]
    assert lp.text_offset == [0, 1, 2, 3, 4]
    assert all(out.choices[0].text[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens, strict=True))
    shaped = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert shaped[0].tokens[:3] == ["a", "b", "c"], "the first chunk carries the prompt's logprobs"
    assert [t for x in shaped for t in x.tokens] == lp.tokens
    assert [o for x in shaped for o in x.text_offset] == lp.text_offset
    assert [v for x in shaped for v in x.token_logprobs] == lp.token_logprobs


def test_echo_with_max_tokens_0_is_the_prompt_alone(front: FakeAsyncEngine) -> None:
    """What evaluation harnesses send to score a text: the prompt, its logprobs, finish_reason "length"."""
    out, chunks = complete(front, prompt="abcd", max_tokens=0, echo=True, logprobs=0)
    choice = out.choices[0]
    assert choice.text == "abcd" and choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.tokens == ["a", "b", "c", "d"]
    assert choice.logprobs.top_logprobs == [None, {}, {}, {}]
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (4, 0)
    assert streamed_text(chunks) == "abcd"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 0
    shaped = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for x in shaped for t in x.tokens] == ["a", "b", "c", "d"]


def test_echo_without_logprobs_asks_the_engine_for_none(front: FakeAsyncEngine) -> None:
    out, _ = complete(front, prompt="ab", max_tokens=0, echo=True)
    assert out.choices[0].text == "ab" and out.choices[0].logprobs is None


def test_echo_with_n_choices_echoes_the_prompt_in_each(front: FakeAsyncEngine) -> None:
    """n = 2 (the fake's choice i generates the prompt rotated by i, its tokens' logprob log(1/2) / (1 + i)):
    each choice's text starts with the prompt and lists the prompt's logprobs first, the same in each;
    streamed, each choice's first chunk carries them and its offsets run on from the echoed text."""
    out, chunks = complete(front, prompt="abc", max_tokens=2, echo=True, logprobs=1, n=2)
    assert [c.text for c in out.choices] == ["abcab", "abcbc"]
    for c in out.choices:
        lp = c.logprobs
        assert lp is not None and lp.tokens == list(c.text) and lp.text_offset == [0, 1, 2, 3, 4]
        assert lp.token_logprobs[:3] == [None, pytest.approx(HALF), pytest.approx(HALF)]
        assert lp.top_logprobs[:3] == [None, {"b": pytest.approx(HALF)}, {"c": pytest.approx(HALF)}]
        assert lp.token_logprobs[3:] == [pytest.approx(HALF / (1 + c.index))] * 2
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 4)
    for i, c in enumerate(out.choices):
        mine = [x.choices[0] for x in chunks if x.choices and x.choices[0].index == i]
        assert mine[0].text.startswith("abc") and "".join(x.text for x in mine) == c.text
        shaped = [x.logprobs for x in mine if x.logprobs]
        assert shaped[0].tokens[:3] == ["a", "b", "c"], "the choice's first chunk carries the prompt's logprobs"
        assert c.logprobs is not None and [o for x in shaped for o in x.text_offset] == c.logprobs.text_offset


def test_echo_with_best_of_ranks_the_generated_tokens(front: FakeAsyncEngine) -> None:
    """best_of=3, n=1 (unary only): the choice returned is the best ranked (the fake's choice 2), echoed."""
    s = OpenAIServing(front, ServerConfig())
    out = asyncio.run(s.generate(CompletionRequest(prompt="abc", max_tokens=2, echo=True, logprobs=0, best_of=3)))
    assert isinstance(out, CompletionResponse) and [c.text for c in out.choices] == ["abcca"]
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens == list("abcca") and lp.token_logprobs[0] is None
    assert out.usage is not None and out.usage.completion_tokens == 6


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "only allowed with echo"),
    ({"prompt": "a", "max_tokens": -1, "echo": True}, "max_tokens", "greater than or equal to 0"),
    ({"prompt": "a", "echo": True, "logprobs": 21}, "logprobs", "20"),
])
def test_bad_echo_combinations_name_the_field(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate(body)
    assert e.value.errors()[0]["loc"][0] == param and words in str(e.value)


def test_chat_echo_is_refused_saying_why() -> None:
    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "echo": True})
    assert e.value.errors()[0]["loc"][0] == "echo" and "/v1/completions" in str(e.value)

"""OpenAI's `n` and `best_of` through the in-process serving layer: the fake engine (choice i echoes the prompt
rotated by i; see fake_engine.py) for the shapes, admission and deadlines, and the real engine front over the
tiny model for exactness (each choice equals the request alone with that choice's seed)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from configs.serve import ServerConfig
from deployments.errors import OpenAIError
from deployments.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    CompletionStreamResponse,
)
from deployments.serving import OpenAIServing
from tests.deployments.fake_engine import FakeAsyncEngine


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(messages=[ChatMessage(role="user", content="hi")], **fields)


async def drain(stream: Any) -> list[Any]:
    return [c async for c in stream]


def by_index(chunks: list[Any], text: Any) -> tuple[dict[int, str], dict[int, list[str]]]:
    """Each choice's streamed text and finish reasons, from the chunks' choices."""
    texts: dict[int, str] = {}
    reasons: dict[int, list[str]] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (text(ch) or "")
            if ch.finish_reason:
                reasons.setdefault(ch.index, []).append(ch.finish_reason)
    return texts, reasons


def test_completions_n_unary_and_streamed(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig())

    async def run() -> tuple[Any, list[CompletionStreamResponse]]:
        out = await s.generate(CompletionRequest(prompt="abcd", max_tokens=9, n=3, stop=["da"]))
        stream = await s.generate_stream(CompletionRequest(prompt="abcd", max_tokens=3, n=3, stream=True,
                                                           logprobs=1, stream_options={"include_usage": True}))
        return out, await drain(stream)

    out, chunks = asyncio.run(run())
    # choice i echoes "abcd" rotated by i; the stop string "da" cuts "cdab" to "c" and "bcda" to "bc".
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [
        (0, "abcd", "stop"), (1, "bc", "stop"), (2, "c", "stop")]
    assert out.usage is not None and out.usage.prompt_tokens == 4  # the prompt once
    assert out.usage.completion_tokens == 5 + 4 + 3  # every choice's tokens (the stop string's included)
    texts, reasons = by_index(chunks, lambda ch: ch.text)
    assert texts == {0: "abc", 1: "bcd", 2: "cda"} and reasons == {0: ["length"], 1: ["length"], 2: ["length"]}
    # Each choice's logprobs' text offsets run on within that choice only.
    for i in range(3):
        offsets = [o for c in chunks for ch in c.choices if ch.index == i and ch.logprobs
                   for o in ch.logprobs.text_offset]
        assert offsets == [0, 1, 2]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
    assert (usage[0].prompt_tokens, usage[0].completion_tokens) == (4, 9)


def test_chat_n_unary_and_streamed(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig())

    async def run() -> tuple[Any, list[ChatCompletionChunk]]:
        out = await s.generate(chat(max_tokens=3, n=2, logprobs=True))
        stream = await s.generate_stream(chat(max_tokens=3, n=2, stream=True, stream_options={"include_usage": True}))
        return out, await drain(stream)

    out, chunks = asyncio.run(run())
    assert [(c.index, c.message.content, c.finish_reason) for c in out.choices] == [(0, "<us", "length"),
                                                                                     (1, "use", "length")]
    assert [len(c.logprobs.content or []) for c in out.choices] == [3, 3]  # type: ignore[union-attr]
    assert out.usage is not None and (out.usage.completion_tokens, out.usage.total_tokens) == (6, 6 + out.usage.prompt_tokens)
    roles = [ch.index for c in chunks for ch in c.choices if ch.delta.role == "assistant"]
    assert roles == [0, 1]  # each choice opens with its role
    texts, reasons = by_index(chunks, lambda ch: ch.delta.content)
    assert texts == {0: "<us", 1: "use"} and reasons == {0: ["length"], 1: ["length"]}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_best_of_returns_the_n_most_likely_choices(front: FakeAsyncEngine) -> None:
    """The fake's choice i has logprob log(1/2) / (1 + i) per token: of 4 choices, 3 then 2 are the best."""
    s = OpenAIServing(front, ServerConfig())

    async def run() -> tuple[Any, Any]:
        return (await s.generate(CompletionRequest(prompt="abcd", max_tokens=4, n=2, best_of=4)),
                await s.generate(CompletionRequest(prompt="abcd", max_tokens=4, n=2, best_of=4, logprobs=0)))

    plain, shown = asyncio.run(run())
    assert [(c.index, c.text) for c in plain.choices] == [(0, "dabc"), (1, "cdab")]
    assert all(c.logprobs is None for c in plain.choices)  # computed for the ranking, not asked for
    assert plain.usage is not None and plain.usage.completion_tokens == 16  # all 4 generated are billed
    lp = shown.choices[0].logprobs
    assert lp is not None and lp.token_logprobs == pytest.approx([math.log(0.5) / 4] * 4)


def test_a_request_takes_one_admission_slot_per_choice(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig(max_pending_requests=4))

    async def run() -> None:
        with pytest.raises(OpenAIError) as e:
            await s.generate(CompletionRequest(prompt="ab", n=5))
        assert (e.value.status_code, e.value.param) == (400, "n")
        with pytest.raises(OpenAIError) as e:
            await s.generate(CompletionRequest(prompt="ab", n=2, best_of=5))
        assert (e.value.status_code, e.value.param) == (400, "best_of")
        long = CompletionRequest(prompt="ab", n=3, max_tokens=200, ignore_eos=True, stream=True)
        stream = await s.generate_stream(long)
        assert s.admission.in_flight == 3
        with pytest.raises(OpenAIError) as e:
            await s.generate(CompletionRequest(prompt="ab", n=2))
        assert e.value.status_code == 429
        assert (await s.generate(CompletionRequest(prompt="ab"))).choices[0].text == "ab"  # one slot left
        await stream.aclose()  # type: ignore[attr-defined]
        assert s.admission.in_flight == 0

    asyncio.run(run())


def test_a_deadline_cuts_every_unfinished_choice_short(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig())

    async def run() -> Any:
        return await s.generate(CompletionRequest(prompt="ab", n=3, max_tokens=400, ignore_eos=True, timeout=0.2))

    out = asyncio.run(run())
    assert [c.finish_reason for c in out.choices] == ["length"] * 3 and out.warning
    assert 0 < out.usage.completion_tokens < 3 * 400  # type: ignore[union-attr]
    assert s.admission.in_flight == 0


# --- the real engine front: every choice is exact ---------------------------------------------------------------


@pytest.fixture
def real_front(tiny_model: Any) -> Any:
    from engine import AsyncBatonEngine
    from tests.helpers import make_engine

    f = AsyncBatonEngine(make_engine(tiny_model, max_batch_size=8, max_model_len=256))
    f.start()
    yield f
    f.shutdown()


@pytest.mark.parametrize("stream", [False, True])
def test_each_choice_equals_the_request_alone_with_its_seed(real_front: Any, stream: bool) -> None:
    s = OpenAIServing(real_front, ServerConfig(served_model_name="tiny"))
    fields = dict(prompt="The weather today", max_tokens=6, temperature=1.2, seed=40, logprobs=1,
                  presence_penalty=0.5, priority=3)

    async def run() -> tuple[dict[int, str], list[Any]]:
        if stream:
            chunks = await drain(await s.generate_stream(CompletionRequest(n=3, stream=True, **fields)))
            texts, reasons = by_index(chunks, lambda ch: ch.text)
            assert all(len(r) == 1 for r in reasons.values())
        else:
            out = await s.generate(CompletionRequest(n=3, **fields))
            texts = {c.index: c.text for c in out.choices}
        alone = [await s.generate(CompletionRequest(**{**fields, "seed": 40 + i})) for i in range(3)]
        return texts, alone

    texts, alone = asyncio.run(run())
    assert texts == {i: a.choices[0].text for i, a in enumerate(alone)}
    assert len(set(texts.values())) > 1  # really different draws


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_n_gives_each_choice_the_prompt_and_its_logprobs(real_front: Any, stream: bool) -> None:
    """echo + logprobs with n = 2 over the real engine: each choice is the echoed request alone with its seed,
    text and logprobs (the prompt's, computed once in the engine, then its own tokens')."""
    s = OpenAIServing(real_front, ServerConfig(served_model_name="tiny"))
    fields = dict(prompt="The weather today", max_tokens=4, temperature=1.2, seed=7, logprobs=1, echo=True)

    async def run() -> tuple[dict[int, str], dict[int, list[Any]], list[Any]]:
        if stream:
            chunks = await drain(await s.generate_stream(CompletionRequest(n=2, stream=True, **fields)))
            texts, _ = by_index(chunks, lambda ch: ch.text)
            tokens: dict[int, list[Any]] = {}
            for c in chunks:
                for ch in c.choices:
                    if ch.logprobs is not None:
                        tokens.setdefault(ch.index, []).extend(ch.logprobs.token_logprobs)
        else:
            out = await s.generate(CompletionRequest(n=2, **fields))
            texts = {c.index: c.text for c in out.choices}
            tokens = {c.index: c.logprobs.token_logprobs for c in out.choices if c.logprobs is not None}
        alone = [await s.generate(CompletionRequest(**{**fields, "seed": 7 + i})) for i in range(2)]
        return texts, tokens, alone

    texts, tokens, alone = asyncio.run(run())
    assert all(t.startswith("The weather today") for t in texts.values())
    assert texts == {i: a.choices[0].text for i, a in enumerate(alone)}
    assert tokens == {i: a.choices[0].logprobs.token_logprobs for i, a in enumerate(alone)}
    assert tokens[0][0] is None and len(tokens[0]) > 4

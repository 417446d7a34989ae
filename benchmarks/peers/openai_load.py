"""An OpenAI-client load generator for any OpenAI-compatible server (vLLM's, ours), streaming every request.

Two request kinds share one driver: a benchmark workload sent to `/v1/completions` with its prompts as
token-id lists, and a chat workload (`chat_workload`) sent to `/v1/chat/completions`. Every request is greedy
(temperature 0) with `ignore_eos` (a vLLM extra field, which ours takes too) so it produces exactly
`max_tokens` tokens; each waits for its arrival time, then for one of `concurrency` slots. The client records
when the first text chunk and the last chunk arrived, the text, and the usage the server reported.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.capped import run_capped
from benchmarks.workloads import BenchRequest, LengthSpec

CHAT_TOPICS = (
    "the water cycle", "how a bicycle gear works", "why the sky is blue", "photosynthesis", "the history of tea",
    "how vaccines train the immune system", "black holes", "the rules of chess", "compound interest",
    "how bread rises", "plate tectonics", "the printing press", "how a refrigerator cools", "honey bees",
    "the Roman aqueducts", "how rainbows form",
)
CHAT_ASKS = ("Explain {} to a ten-year-old.", "Write a short poem about {}.", "Give three surprising facts about {}.")


@dataclass(frozen=True)
class ChatRequest:
    request_id: str
    messages: list[dict[str, str]]
    max_tokens: int  # exact output length (EOS ignored)
    arrival_s: float = 0.0


@dataclass
class StreamOutcome:
    """What the client saw for one streamed request (times in seconds from the run's start)."""

    request_id: str
    max_tokens: int
    sent_s: float | None = None
    first_token_s: float | None = None  # first chunk carrying text
    finish_s: float | None = None  # the stream's end
    completion_tokens: int | None = None  # usage reported by the server
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None and self.completion_tokens is not None

    @property
    def exact(self) -> bool:
        return self.ok and self.completion_tokens == self.max_tokens


def chat_workload(n: int, seed: int, lengths: LengthSpec) -> tuple[ChatRequest, ...]:
    """`n` single-turn chat requests (a topic and an ask each), output lengths exponential like the workloads'."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        ask = CHAT_ASKS[(i // len(CHAT_TOPICS)) % len(CHAT_ASKS)].format(CHAT_TOPICS[i % len(CHAT_TOPICS)])
        out = max(1, min(lengths.output_cap, round(rng.expovariate(1.0 / lengths.output_mean))))
        reqs.append(ChatRequest(f"chat{i}", [{"role": "user", "content": ask}], out))
    return tuple(reqs)


def _stream_args(model: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "extra_body": {"ignore_eos": True}}


async def _consume(stream: Any, o: StreamOutcome, t0: float, text_of: Callable[[Any], str | None]) -> None:
    async for chunk in stream:
        piece = text_of(chunk) if chunk.choices else None
        if piece:
            if o.first_token_s is None:
                o.first_token_s = time.perf_counter() - t0
            o.text += piece
        if chunk.usage is not None:
            o.completion_tokens = chunk.usage.completion_tokens
    o.finish_s = time.perf_counter() - t0


async def _one(client: Any, model: str, r: BenchRequest | ChatRequest, o: StreamOutcome, t0: float) -> None:
    if isinstance(r, ChatRequest):
        stream = await client.chat.completions.create(messages=r.messages, **_stream_args(model, r.max_tokens))
        await _consume(stream, o, t0, lambda c: c.choices[0].delta.content)
    else:
        stream = await client.completions.create(prompt=r.prompt, **_stream_args(model, r.max_tokens))
        await _consume(stream, o, t0, lambda c: c.choices[0].text)


async def drive(base_url: str, model: str, requests: Sequence[BenchRequest | ChatRequest], concurrency: int, cap_s: float, progress: Callable[[int], Any] = lambda n: None
                ) -> tuple[list[StreamOutcome], float]:
    """Send every request at its arrival time with at most `concurrency` in flight; returns the outcomes and the
    wall time from the start to the last response (or `cap_s`; unanswered requests fail)."""
    from openai import AsyncOpenAI, DefaultAsyncHttpxClient

    outcomes = [StreamOutcome(r.request_id, r.max_tokens) for r in requests]
    gate = asyncio.Semaphore(concurrency)
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=cap_s + 60,
                         http_client=DefaultAsyncHttpxClient(trust_env=False))  # never through an HTTP(S)_PROXY
    t0 = time.perf_counter()

    async def one(r: BenchRequest | ChatRequest, o: StreamOutcome) -> None:
        await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - t0)))
        async with gate:
            o.sent_s = time.perf_counter() - t0
            try:
                await _one(client, model, r, o, t0)
            except Exception as e:  # an API or transport error fails this request only; it is reported
                o.error = f"{type(e).__name__}: {e}"
            progress(o.completion_tokens or 0)

    try:
        wall = await run_capped((one(r, o) for r, o in zip(requests, outcomes, strict=True)), cap_s, t0)
    finally:
        await client.close()
    for o in outcomes:
        if not o.ok and o.error is None:
            o.error = f"not answered within the {cap_s:g} s cap"
    return outcomes, wall

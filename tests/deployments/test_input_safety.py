"""Hostile or unusual input against the serving layer, in process (fake engine, no Ray): every request gets
an answer or an OpenAI-shaped 4xx naming the field, no admission slot leaks, nothing stalls the event loop,
and the replica serves normally afterwards. HTTP-level limits (auth before body, body size and time) are in
test_http_limits.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest

from configs.serve import ServerConfig
from deployments.errors import OpenAIError
from deployments.http_body import parse_request
from deployments.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest
from deployments.serving import OpenAIServing
from tests.deployments.fake_engine import FakeAsyncEngine


def parse(body: dict[str, Any]) -> GenerateRequest:
    """A JSON body as the HTTP route parses it (the same function)."""
    kind: type[GenerateRequest] = ChatCompletionRequest if "messages" in body else CompletionRequest
    return parse_request(json.dumps(body).encode(), kind)


async def status_of(serving: OpenAIServing, body: dict[str, Any]) -> tuple[int, str | None]:
    """(HTTP status, error param) of one request, run to the end."""
    try:
        await serving.generate(parse(body))
    except OpenAIError as e:
        return e.status_code, e.param
    return 200, None


async def still_serves(serving: OpenAIServing) -> None:
    out = await serving.generate(CompletionRequest(prompt="ok", max_tokens=2))
    assert out.choices[0].text == "ok"  # type: ignore[union-attr]


def test_untokenizable_prompt_is_a_400_and_keeps_no_slot(front: FakeAsyncEngine) -> None:
    """A lone surrogate (legal JSON) made the tokenizer raise TypeError; the slot leaked, and after 24 such
    requests the replica refused everything with 429 for good. Now: a 400 naming the field, every time."""
    s = OpenAIServing(front, ServerConfig(max_pending_requests=3))

    async def run() -> None:
        for _ in range(30):
            assert await status_of(s, {"prompt": "\ud800", "max_tokens": 4}) == (400, "prompt")
            assert await status_of(s, {"prompt": ["a\udfffb"], "max_tokens": 4}) == (400, "prompt")
        assert s.admission.in_flight == 0
        await still_serves(s)

    asyncio.run(run())


def test_untokenizable_chat_message_is_a_400(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig(max_pending_requests=3))
    text_part = [{"type": "text", "text": "x\ud800"}]

    async def run() -> None:
        for content in ("\ud800", text_part):
            status, param = await status_of(s, {"messages": [{"role": "user", "content": content}]})
            assert status == 400 and param is not None and param.startswith("messages.0.content"), param
        status, param = await status_of(s, {"prompt": "x", "stop": ["\udc00"]})
        assert (status, param) == (400, "stop")
        assert s.admission.in_flight == 0
        await still_serves(s)

    asyncio.run(run())


@pytest.mark.parametrize("where", ["encode", "template", "submit"])
def test_any_exception_after_admission_gives_the_slot_back(
    front: FakeAsyncEngine, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """Whatever the tokenizer, the chat template or the engine raises (not only ValueError/RuntimeError),
    the admission slot is released: input the tokenizer cannot take is a 400 naming the field, an engine bug
    an OpenAI-shaped 500."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("cannot take this")

    target = front if where == "submit" else front.engine.tokenizer
    name = {"encode": "encode", "template": "apply_chat_template", "submit": "submit"}[where]
    monkeypatch.setattr(target, name, boom)
    s = OpenAIServing(front, ServerConfig(max_pending_requests=2))
    body: dict[str, Any] = (
        {"messages": [{"role": "user", "content": "hi"}]} if where == "template" else {"prompt": "hi"}
    )
    expected = {"encode": (400, "prompt"), "template": (400, "messages"), "submit": (500, None)}[where]

    async def run() -> None:
        for _ in range(5):
            assert await status_of(s, body) == expected
        assert s.admission.in_flight == 0

    asyncio.run(run())


LOOSE = [
    ({"prompt": "x", "priority": -(2**200)}, "priority"),
    ({"prompt": "x", "priority": 1001}, "priority"),
    ({"prompt": "x", "priority": 1.5}, "priority"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream": 1}, "stream"),
    ({"prompt": [True, False]}, "prompt"),
    ({"prompt": [[True]]}, "prompt"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.0}, "max_tokens"),
    ({"prompt": "x", "temperature": "0.5"}, "temperature"),
    ({"prompt": "x", "seed": True}, "seed"),
    ({"prompt": "x", "ignore_eos": "false"}, "ignore_eos"),
    ({"prompt": "x", "stop_token_ids": [False]}, "stop_token_ids.0"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 0}, "logprobs"),
]


@pytest.mark.parametrize(("body", "param"), LOOSE, ids=[f"{p}-{i}" for i, (_, p) in enumerate(LOOSE)])
def test_loose_types_and_unbounded_priority_are_400s(
    front: FakeAsyncEngine, body: dict[str, Any], param: str
) -> None:
    """Strict types where OpenAI's schema is strict ("yes" is no boolean, true is no token id) and a priority
    within [priority_min, priority_max] (default +-1000)."""
    s = OpenAIServing(front, ServerConfig())
    status, got = asyncio.run(status_of(s, body))
    assert (status, got) == (400, param)
    assert s.admission.in_flight == 0


def test_priority_range_is_configurable(front: FakeAsyncEngine) -> None:
    s = OpenAIServing(front, ServerConfig(priority_min=-5, priority_max=5))

    async def run() -> None:
        assert await status_of(s, {"prompt": "x", "priority": -5}) == (200, None)
        assert await status_of(s, {"prompt": "x", "priority": 5}) == (200, None)
        assert await status_of(s, {"prompt": "x", "priority": 6}) == (400, "priority")

    asyncio.run(run())
    with pytest.raises(ValueError, match="priority_min"):
        ServerConfig(priority_min=3, priority_max=2)


class SlowTokenizer:
    """Wraps the fake tokenizer; every call takes `delay_s` without holding the GIL (as the Hugging Face fast
    tokenizer releases it), and records the thread it ran on."""

    def __init__(self, inner: Any, delay_s: float) -> None:
        self._inner, self._delay_s = inner, delay_s
        self.threads: set[int] = set()

    def _slow(self) -> None:
        self.threads.add(threading.get_ident())
        time.sleep(self._delay_s)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self._slow()
        return self._inner.encode(text, add_special_tokens)  # type: ignore[no-any-return]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self._slow()
        return self._inner(text, add_special_tokens)  # type: ignore[no-any-return]

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner.apply_chat_template(*args, **kwargs)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_tokenizing_runs_off_the_event_loop(front: FakeAsyncEngine, kind: str) -> None:
    """A prompt that takes 1 s to tokenize (a 4 MiB prompt took 2+ s) must not stall the event loop: a
    ticker on the loop keeps ticking, and other requests keep streaming, while it is tokenized."""
    slow = SlowTokenizer(front.engine.tokenizer, delay_s=1.0)
    front.engine.tokenizer = slow  # type: ignore[assignment]
    s = OpenAIServing(front, ServerConfig())
    body: dict[str, Any] = (
        {"prompt": "slow", "max_tokens": 3} if kind == "completion"
        else {"messages": [{"role": "user", "content": "slow"}], "max_tokens": 3}
    )

    async def run() -> float:
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.01)
                t = time.monotonic()
                gaps.append(t - last)
                last = t

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.05)
        out = await s.generate(parse(body))
        done.set()
        await tick
        assert out.usage is not None and out.usage.completion_tokens == 3
        return max(gaps)

    worst_gap = asyncio.run(run())
    assert worst_gap < 0.3, f"the event loop stalled for {worst_gap:.2f} s"
    assert threading.main_thread().ident not in slow.threads

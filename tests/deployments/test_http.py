"""The OpenAI HTTP API on real Ray Serve (loopback), over the fake engine: httpx and the openai client.

The fake engine echoes the prompt one character per iteration then stops ("abc" -> "abc", finish "stop");
see fake_engine.py.
"""

from __future__ import annotations

import asyncio
import json
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
from tests.deployments.serve_testing import fake_factory

MODEL = "fake-model"
API_KEY = "sk-test-key"
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def base_url(serve_instance: str) -> Iterator[str]:
    engine = EngineConfig(model="fake", max_batch_size=4, max_model_len=256)
    serve.run_many(
        [
            RunTarget(make_app(engine, ServerConfig(served_model_name=MODEL), fake_factory()), "baton", "/"),
            RunTarget(
                make_app(engine, ServerConfig(served_model_name=MODEL, api_key=API_KEY), fake_factory()),
                "baton-auth",
                "/auth",
            ),
            RunTarget(
                make_app(engine, ServerConfig(served_model_name=MODEL, allowed_origins=[ORIGIN]), fake_factory()),
                "baton-cors",
                "/cors",
            ),
        ]
    )
    yield serve_instance


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


@pytest.fixture
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def sse_events(response: httpx.Response) -> list[Any]:
    """The data events of an SSE response: parsed JSON, and the literal "[DONE]"."""
    events: list[Any] = []
    for line in response.iter_lines():
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --- happy paths (httpx) --------------------------------------------------------------------------------


def test_health_and_models(http: httpx.Client) -> None:
    assert http.get("/health").json() == {"status": "ok"}
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL


def test_completion(http: httpx.Client) -> None:
    r = http.post(
        "/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 10, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    assert body["choices"][0]["text"] == "abc"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_completion_length_and_token_prompt(http: httpx.Client) -> None:
    body = http.post(
        "/v1/completions", json={"prompt": [ord("x"), ord("y"), ord("z")], "max_tokens": 2}
    ).json()
    assert body["choices"][0] == {"index": 0, "text": "xy", "logprobs": None, "finish_reason": "length"}
    assert body["usage"]["completion_tokens"] == 2


def test_completion_stop_string(http: httpx.Client) -> None:
    body = http.post(
        "/v1/completions", json={"prompt": "hello world", "max_tokens": 50, "stop": [" w"]}
    ).json()
    assert body["choices"][0]["text"] == "hello"
    assert body["choices"][0]["finish_reason"] == "stop"


def test_completion_stream(http: httpx.Client) -> None:
    payload = {"prompt": "abcd", "max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=payload) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "abcd"
    finals = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finals[-1] == "stop" and set(finals[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_chat(http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    body = http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 100}
    ).json()
    assert body["object"] == "chat.completion"
    # The fake echoes the templated prompt: proof the chat template was applied.
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "<system>S\n<user>hi\n<assistant>",
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len("<system>S\n<user>hi\n<assistant>")


def test_chat_stream(http: httpx.Client) -> None:
    payload = {"messages": [{"role": "user", "content": "yo"}], "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=payload) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "<user"
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_priority_orders_the_queue(base_url: str) -> None:
    """With every row busy, a later but more urgent request (lower priority value) runs first."""

    async def run() -> list[str]:
        finished: list[str] = []
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:

            async def complete(tag: str, prompt: str, max_tokens: int, priority: int) -> None:
                body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "priority": priority}
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                finished.append(tag)

            blockers = [asyncio.create_task(complete(f"blocker{i}", "b", 240, 0)) for i in range(4)]  # ~1.2 s
            await asyncio.sleep(0.3)  # the blockers hold all 4 rows
            low = asyncio.create_task(complete("low", "l", 5, 10))
            await asyncio.sleep(0.1)
            high = asyncio.create_task(complete("high", "h", 5, -10))
            await asyncio.gather(*blockers, low, high)
        return finished

    order = asyncio.run(run())
    assert order.index("high") < order.index("low"), order


# --- the openai client ------------------------------------------------------------------------------------


def test_openai_client_completions(oai: openai.OpenAI) -> None:
    out = oai.completions.create(model=MODEL, prompt="hey", max_tokens=8, temperature=0)
    assert out.choices[0].text == "hey" and out.choices[0].finish_reason == "stop"
    assert out.usage is not None and out.usage.total_tokens == 7
    text = "".join(
        c.choices[0].text
        for c in oai.completions.create(model=MODEL, prompt="hey", max_tokens=8, stream=True)
        if c.choices
    )
    assert text == "hey"


def test_openai_client_chat(oai: openai.OpenAI) -> None:
    msgs: Any = [{"role": "user", "content": "ok"}]
    out = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, seed=1, stop=["zz"])
    assert out.choices[0].message.content == "<use" and out.choices[0].finish_reason == "length"
    stream = oai.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "<use"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    # The response message can be sent back as history, as clients do.
    follow = oai.chat.completions.create(
        model=MODEL,
        messages=[*msgs, out.choices[0].message, {"role": "user", "content": "more"}],
        max_tokens=2,
    )
    assert follow.choices[0].message.content == "<u"


def test_openai_client_extra_priority_and_models(oai: openai.OpenAI) -> None:
    out = oai.completions.create(model=MODEL, prompt="pq", max_tokens=4, extra_body={"priority": -3})
    assert out.choices[0].text == "pq"
    assert [m.id for m in oai.models.list()] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL


def test_openai_client_errors(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", n=17)
    assert "less than or equal to 16" in str(e.value) and e.value.body["param"] == "n"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_logprobs=3)
    assert e.value.body["param"] == "top_logprobs"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as nf:
        oai.completions.create(model="gpt-17", prompt="x")
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):  # a streaming request fails before the stream starts
        oai.completions.create(model=MODEL, prompt="x", stream=True, temperature=7)
    assert oai.completions.create(model=MODEL, prompt="ok", max_tokens=2).choices[0].text == "ok"


def test_openai_client_n_choices_streamed_and_not(oai: openai.OpenAI) -> None:
    """n choices in OpenAI's shapes (the fake's choice i echoes the prompt rotated by i): choices[index], each
    with its own finish_reason; stream chunks carry the index; usage counts the prompt once."""
    out = oai.completions.create(model=MODEL, prompt="hey", max_tokens=8, n=3, seed=4)
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [
        (0, "hey", "stop"), (1, "eyh", "stop"), (2, "yhe", "stop")]
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (3, 12)
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for c in oai.completions.create(model=MODEL, prompt="hey", max_tokens=2, n=3, stream=True,
                                    stream_options={"include_usage": True}):
        usage = c.usage or usage
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                assert ch.index not in reasons
                reasons[ch.index] = ch.finish_reason
    assert texts == {0: "he", 1: "ey", 2: "yh"} and reasons == {0: "length", 1: "length", 2: "length"}
    assert usage is not None and usage.completion_tokens == 6 and usage.prompt_tokens == 3
    msgs: Any = [{"role": "user", "content": "ok"}]
    chat = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, n=2)
    assert [(c.index, c.message.content) for c in chat.choices] == [(0, "<us"), (1, "use")]
    deltas: dict[int, str] = {}
    for c in oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, n=2, stream=True):
        for ch in c.choices:
            deltas[ch.index] = deltas.get(ch.index, "") + (ch.delta.content or "")
    assert deltas == {0: "<us", 1: "use"}
    best = oai.completions.create(model=MODEL, prompt="hey", max_tokens=3, n=1, best_of=3)
    assert [(c.index, c.text) for c in best.choices] == [(0, "yhe")]  # the fake's most likely choice


# Each logit adjustment as the official client sends it: OpenAI's as keyword arguments, vLLM's in extra_body.
ADJUSTMENTS: list[dict[str, Any]] = [
    {"presence_penalty": 1.5},
    {"frequency_penalty": -0.5},
    {"logit_bias": {"104": 5, "0": -100}},
    {"extra_body": {"repetition_penalty": 1.3}},
    {"extra_body": {"min_tokens": 2}},
]


@pytest.mark.parametrize("fields", ADJUSTMENTS, ids=lambda f: next(iter(f.get("extra_body", f))))
def test_openai_client_sends_each_logit_adjustment(oai: openai.OpenAI, fields: dict[str, Any]) -> None:
    """Accepted for completions and chat, unary and streamed (the fake engine ignores them: the effect of
    each on a real model is tested in test_real_model.py)."""
    assert_accepted(oai, fields, fields)


def assert_accepted(oai: openai.OpenAI, completion_fields: dict[str, Any], chat_fields: dict[str, Any]) -> None:
    """The fields are accepted by completions and chat, unary and streamed, and the fake echoes as usual."""
    out = oai.completions.create(model=MODEL, prompt="hey", max_tokens=8, **completion_fields)
    assert out.choices[0].text == "hey"
    streamed = oai.completions.create(model=MODEL, prompt="hey", max_tokens=8, stream=True, **completion_fields)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == "hey"
    msgs: Any = [{"role": "user", "content": "ok"}]
    chat = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, **chat_fields)
    assert chat.choices[0].message.content == "<use"
    chunks = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, stream=True, **chat_fields)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "<use"


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -2.5}, "frequency_penalty", "greater than or equal to -2"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "decimal integers"),
    ({"logit_bias": {"7": -101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"55296": 1}}, "logit_bias", "outside the vocabulary"),
    ({"extra_body": {"repetition_penalty": -1}}, "repetition_penalty", "greater than 0"),
    ({"extra_body": {"min_tokens": 9}}, "min_tokens", "max_tokens=8"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_openai_client_bad_logit_adjustments_are_400s(
    oai: openai.OpenAI, fields: dict[str, Any], param: str, words: str, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=8, stream=stream, **fields)
    assert e.value.body["param"] == param and words in e.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                    stream=stream, **fields)
    assert e.value.body["param"] == param  # type: ignore[index]


# Structured output as the official client sends it: response_format as a keyword (chat; the client's legacy
# completions have no such argument, so there it goes in extra_body, as vLLM's fields do).
PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
CONSTRAINTS: list[dict[str, Any]] = [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}},
    {"response_format": {"type": "text"}},
    {"extra_body": {"guided_regex": "[a-z]+"}},
    {"extra_body": {"guided_choice": ["yes", "no"]}},
]


@pytest.mark.parametrize("fields", CONSTRAINTS, ids=["json_object", "json_schema", "text", "regex", "choice"])
def test_openai_client_sends_each_structured_output_constraint(oai: openai.OpenAI, fields: dict[str, Any]) -> None:
    """Accepted for completions and chat, unary and streamed, and compiled at the ingress on the way (the
    fake engine cannot honour a grammar: real outputs are tested in test_real_model.py)."""
    assert_accepted(oai, _completions(fields), fields)


def _completions(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` as the client's completions call takes them: response_format moved into extra_body."""
    if "response_format" not in fields:
        return fields
    rest = {k: v for k, v in fields.items() if k != "response_format"}
    return {**rest, "extra_body": {**fields.get("extra_body", {}), "response_format": fields["response_format"]}}


def _schema(schema: Any) -> dict[str, Any]:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


@pytest.mark.parametrize(("fields", "param", "words"), [
    (_schema({"type": "objekt"}), "response_format", "does not compile"),
    (_schema({"properties": {"a": {"$ref": "#/nowhere"}}}), "response_format", "does not compile"),
    (_schema([1]), "response_format.json_schema.schema", "dictionary"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema is required"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "s", "schema": {}}}}, "response_format",
     "only then"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
     "response_format.json_schema.name", "pattern"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra", "extra"),
    ({"extra_body": {"guided_regex": "[a-"}}, "guided_regex", "does not compile"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice", "at least 1"),
    ({"extra_body": {"guided_choice": ["a", ""]}}, "guided_choice", "must not be empty"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, None,
     "got response_format and guided_regex"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, None, "got guided_regex and guided_choice"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_openai_client_bad_structured_output_is_a_400_naming_the_field(
    oai: openai.OpenAI, fields: dict[str, Any], param: str | None, words: str, stream: bool
) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt="x", max_tokens=8, stream=stream, **_completions(fields))
    body: Any = e.value.body
    assert body["param"] == param and words in body["message"], body
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
                                    stream=stream, **fields)
    body = e.value.body
    assert body["param"] == param and words in body["message"], body


def test_openai_client_parses_logprobs(oai: openai.OpenAI) -> None:
    """The fake's logprobs (fake_engine.py): each token log(1/2), alternatives t, t+1, ... halving."""
    msgs: Any = [{"role": "user", "content": "x"}]
    chat = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and "".join(c.token for c in content) == chat.choices[0].message.content == "<us"
    assert [[t.token for t in c.top_logprobs] for c in content][0] == ["<", "="]
    assert content[0].logprob == pytest.approx(-0.6931, abs=1e-3) and content[0].bytes == [60]
    streamed = oai.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3, logprobs=True, stream=True)
    tokens = [c.token for ch in streamed if ch.choices and ch.choices[0].logprobs
              for c in ch.choices[0].logprobs.content or []]
    assert tokens == ["<", "u", "s"]
    done = oai.completions.create(model=MODEL, prompt="pq", max_tokens=4, logprobs=1)
    lp = done.choices[0].logprobs
    assert lp is not None and lp.tokens == ["p", "q", ""] and lp.text_offset == [0, 1, 2]  # "" is the EOS
    assert lp.top_logprobs == [{"p": pytest.approx(-0.6931, abs=1e-3)}, {"q": pytest.approx(-0.6931, abs=1e-3)},
                               {"": pytest.approx(-0.6931, abs=1e-3)}]
    plain = oai.completions.create(model=MODEL, prompt="pq", max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_openai_client_echo(oai: openai.OpenAI) -> None:
    """echo: the prompt before the completion, with its tokens' logprobs first (the first null); max_tokens=0
    scores the prompt alone (what lm-eval-harness sends); streamed, the first chunk carries the prompt."""
    half = pytest.approx(-0.6931, abs=1e-3)
    out = oai.completions.create(model=MODEL, prompt="pq", max_tokens=1, echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == "pqp" and out.choices[0].finish_reason == "length"
    assert lp is not None and lp.tokens == ["p", "q", "p"] and lp.text_offset == [0, 1, 2]
    assert lp.token_logprobs == [None, half, half] and lp.top_logprobs == [None, {"q": half}, {"p": half}]
    scored = oai.completions.create(model=MODEL, prompt=[ord("r"), ord("s")], max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == "rs" and scored.choices[0].finish_reason == "length"
    assert scored.choices[0].logprobs is not None and scored.choices[0].logprobs.token_logprobs == [None, half]
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    plain = oai.completions.create(model=MODEL, prompt="pq", max_tokens=2, echo=True)
    assert plain.choices[0].text == "pqpq" and plain.choices[0].logprobs is None
    chunks = [c for c in oai.completions.create(model=MODEL, prompt="pq", max_tokens=2, echo=True, logprobs=0,
                                                stream=True) if c.choices]
    assert chunks[0].choices[0].text.startswith("pq") and "".join(c.choices[0].text for c in chunks) == "pqpq"
    first = chunks[0].choices[0].logprobs
    assert first is not None and first.tokens[:2] == ["p", "q"] and first.token_logprobs[0] is None
    only = [c for c in oai.completions.create(model=MODEL, prompt="pq", max_tokens=0, echo=True, stream=True)
            if c.choices]
    assert "".join(c.choices[0].text for c in only) == "pq" and only[-1].choices[0].finish_reason == "length"


# --- errors: 4xx in the OpenAI shape, and the server keeps serving -----------------------------------------

BAD_REQUESTS = [
    # (path, json body or raw bytes, status, param, words in the message)
    ("/v1/completions", {"prompt": "x", "n": 17}, 400, "n", "less than or equal to 16"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("/v1/completions", {"prompt": "x", "n": 2.0}, 400, "n", "integer"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of", "must be >= n"),
    ("/v1/completions", {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of", "stream=true"),
    ("/v1/completions", {"prompt": "x", "best_of": 17}, 400, "best_of", "less than or equal to 16"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "only allowed with echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, 400, "echo",
     "/v1/completions"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "less than or equal to 20"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, 400, "logprobs", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "x", "logprobs": True}, 400, "logprobs", "integer"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty", "less than or equal to 2"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "frequency_penalty", "greater than or equal"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": "1"}, 400, "frequency_penalty", "number"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "greater than 0"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x1": 5}}, 400, "logit_bias", "decimal integers, got 'x1'"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"-1": 5}}, 400, "logit_bias", "decimal integers"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 100.5}}, 400, "logit_bias", "in [-100, 100]"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": True}}, 400, "logit_bias.5", "number"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias",
     "at most 300"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"60000": 1}}, 400, "logit_bias", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "min_tokens": -1}, 400, "min_tokens", "greater than or equal to 0"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens", "max_tokens=4"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "suffix"),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "greater than"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "greater than"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "", "stream"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "required"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("/v1/completions", {"prompt": "x" * 300}, 400, "prompt", "max_model_len"),
    ("/v1/completions", {"prompt": "x", "priority": "high"}, 400, "priority", "integer"),
    ("/v1/completions", b"{not json", 400, None, "JSON"),
    ("/v1/completions", {"prompt": "x", "model": "nope"}, 404, "model", "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
        "user",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n", "16"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "best_of": 2}, 400, "best_of",
     "unknown field"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        400,
        "top_logprobs",
        "less than or equal to 20",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        400,
        "top_logprobs",
        "requires logprobs=true",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": 1},
        400,
        "logprobs",
        "boolean",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1.5": 1}},
        400,
        "logit_bias",
        "decimal integers",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "min_tokens": 3},
        400,
        "min_tokens",
        "max_tokens=2",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "presence_penalty": -2.01},
        400,
        "presence_penalty",
        "greater than or equal to -2",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        400,
        "tools",
        "tool",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
        400,
        "response_format.type",
        "json_object",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "max_completion_tokens": 3},
        400,
        "",
        "disagree",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x" * 300}]},
        400,
        "messages",
        "context",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), BAD_REQUESTS)
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_bad_requests_get_4xx_with_the_field(
    http: httpx.Client, path: str, body: Any, status: int, param: str | None, words: str, stream: bool
) -> None:
    if stream and (not isinstance(body, dict) or "stream_options" in body):
        pytest.skip("only meaningful without stream=true")
    if isinstance(body, dict):
        payload = {**body, "stream": True} if stream else body
        r = http.post(path, json=payload)
    else:
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert words.lower() in err["message"].lower(), err
    if param:
        assert err["param"] == param, err
    # ... and the server keeps serving.
    assert (
        http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).json()["choices"][0]["text"]
        == "ok"
    )


# --- /tokenize and /detokenize (vLLM's shapes) -------------------------------------------------------------


def test_tokenize_and_detokenize(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "abc"})
    assert r.status_code == 200 and r.json() == {"tokens": [97, 98, 99], "count": 3, "max_model_len": 256}
    msgs = [{"role": "user", "content": "hi"}]
    templated = http.post("/tokenize", json={"messages": msgs}).json()
    assert templated["tokens"] == [ord(c) for c in "<user>hi\n<assistant>"]  # the fake's chat template
    bare = http.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False}).json()
    assert bare["tokens"] == [ord(c) for c in "<user>hi\n"] and bare["count"] == 9
    chat = http.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}).json()
    assert chat["usage"]["prompt_tokens"] == templated["count"]  # what generation sees
    assert http.post("/tokenize", json={"prompt": ""}).json()["tokens"] == []
    back = http.post("/detokenize", json={"model": MODEL, "tokens": templated["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": "<user>hi\n<assistant>"}
    assert http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


TOKENIZER_BAD = [
    ("/detokenize", {"tokens": [104, -1]}, 400, "tokens", "outside the vocabulary"),
    ("/detokenize", {"tokens": [0xD800]}, 400, "tokens", "outside the vocabulary"),
    ("/detokenize", {"tokens": [True]}, 400, "tokens.0", "integer"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens", "list"),
    ("/detokenize", {}, 400, "tokens", "required"),
    ("/detokenize", {"tokens": [1], "model": "nope"}, 404, "model", "does not exist"),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model", "does not exist"),
    ("/tokenize", {}, 400, "prompt", "required"),
    ("/tokenize", {"prompt": 5}, 400, "prompt", "string"),
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt", "surrogate"),
    ("/tokenize", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ("/tokenize", {"messages": [], "add_generation_prompt": True}, 400, "messages", "at least 1"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "prompt": "y"}, 400, "prompt", "unknown"),
    ("/tokenize", b"[1, 2]", 400, None, "JSON object"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "words"), TOKENIZER_BAD)
def test_bad_tokenizer_requests_get_4xx_with_the_field(
    http: httpx.Client, path: str, body: Any, status: int, param: str | None, words: str
) -> None:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower() and err["param"] == param, err


def test_tokenizer_routes_check_the_api_key(base_url: str) -> None:
    for path, body in (("/tokenize", {"prompt": "k"}), ("/detokenize", {"tokens": [107]})):
        assert httpx.post(f"{base_url}/auth{path}", json=body).status_code == 401
        ok = httpx.post(f"{base_url}/auth{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200, ok.text


# --- X-Request-Id ---------------------------------------------------------------------------------------------


def test_client_request_id_is_the_engines_and_is_echoed(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2}, headers={"X-Request-Id": "job-7/a.1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "job-7/a.1" and r.json()["id"] == "job-7/a.1"
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"X-Request-Id": "s-1"}) as s:
        assert s.status_code == 200 and s.headers["x-request-id"] == "s-1"
        events = sse_events(s)
    assert {e["id"] for e in events if e != "[DONE]"} == {"s-1"}
    fresh = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2})
    assert fresh.headers["x-request-id"] == fresh.json()["id"]  # one id, whoever made it
    refused = http.post("/v1/completions", json={"prompt": "x", "n": 17}, headers={"X-Request-Id": "bad-n"})
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "bad-n"


@pytest.mark.parametrize("bad", ["has space", "x" * 257, "caf\u00e9", "tab\there"])
def test_a_bad_request_id_is_a_400_naming_the_header(http: httpx.Client, bad: str) -> None:
    raw = bad.encode()  # (bytes that are not UTF-8 never reach the replica: Serve's proxy answers a plain 500)
    r = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": 2}, headers=[(b"X-Request-Id", raw)])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "X-Request-Id"


def test_a_request_id_still_running_is_a_409(http: httpx.Client) -> None:
    body = {"prompt": "abc", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "twice"}) as first:
        assert first.status_code == 200
        again = http.post("/v1/completions", json={"prompt": "x"}, headers={"X-Request-Id": "twice"})
        assert again.status_code == 409, again.text
        assert again.json()["error"]["param"] == "X-Request-Id"
        assert again.json()["error"]["code"] == "duplicate_request_id"
    # once the first one is over (the client closed it), the id is free again
    ok = http.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}, headers={"X-Request-Id": "twice"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"


def test_unknown_route_and_method(http: httpx.Client) -> None:
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"].startswith("Method Not Allowed")
    r = http.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_api_key(base_url: str) -> None:
    url = f"{base_url}/auth/v1/completions"
    body = {"prompt": "k", "max_tokens": 1}
    missing = httpx.post(url, json=body)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "Incorrect API key" in wrong.json()["error"]["message"]
    ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "k"
    assert httpx.get(f"{base_url}/auth/health").status_code == 200  # health stays open
    client = openai.OpenAI(base_url=f"{base_url}/auth/v1", api_key=API_KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="k", max_tokens=1).choices[0].text == "k"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/auth/v1", api_key="bad", max_retries=0).models.list()


def test_many_concurrent_requests(base_url: str) -> None:
    """More requests than rows: all finish with full answers (queued in the engine, not refused)."""

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:

            async def one(i: int) -> str:
                r = await client.post("/v1/completions", json={"prompt": f"q{i:02d}", "max_tokens": 10})
                assert r.status_code == 200, r.text
                return str(r.json()["choices"][0]["text"])

            return await asyncio.gather(*(one(i) for i in range(16)))

    t0 = time.monotonic()
    assert asyncio.run(run()) == [f"q{i:02d}" for i in range(16)]
    assert time.monotonic() - t0 < 30


def test_prometheus_metrics_are_exported(base_url: str, metrics_port: int) -> None:
    """The replica's metrics reach Ray's Prometheus endpoint under vLLM-like names (ray_ prefix)."""
    httpx.post(f"{base_url}/v1/completions", json={"prompt": "metrics", "max_tokens": 5}, timeout=10)
    wanted = {
        "ray_baton_num_requests_running",
        "ray_baton_num_requests_waiting",
        "ray_baton_num_requests_swapped",
        "ray_baton_kv_cache_usage_perc",
        "ray_baton_memory_used_fraction",
        "ray_baton_batch_capacity",
        "ray_baton_idle_computation_fraction",
        "ray_baton_generation_tokens_total",
        "ray_baton_time_to_first_token_seconds_bucket",
        "ray_baton_time_per_output_token_seconds_bucket",
        "ray_baton_e2e_request_latency_seconds_bucket",
        "ray_baton_request_success_total",
    }

    def exported() -> set[str]:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        names = {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_baton_")}
        return wanted - names

    missing: set[str] = set(wanted)
    for _ in range(40):
        missing = exported()
        if not missing:
            break
        time.sleep(1)
    assert not missing


def test_metrics_on_the_http_port(base_url: str) -> None:
    """GET /metrics serves the replicas' ray_baton_* metrics in Prometheus text, each family's HELP/TYPE once."""
    httpx.post(f"{base_url}/v1/completions", json={"prompt": "metrics", "max_tokens": 5}, timeout=10)
    wanted = {"ray_baton_num_requests_running", "ray_baton_time_to_first_token_seconds_bucket",
              "ray_baton_generation_tokens_total"}
    text = ""
    for _ in range(40):
        r = httpx.get(f"{base_url}/metrics", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
        if wanted <= {line.split("{")[0] for line in text.splitlines()}:
            break
        time.sleep(1)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    assert wanted <= names, sorted(names)
    assert all(name.startswith("ray_baton_") for name in names)
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)) and types


def test_cors_only_for_configured_origins(base_url: str) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(f"{base_url}/cors/v1/chat/completions", headers=preflight, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    r = httpx.options(f"{base_url}/cors/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"},
                      timeout=10)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    body = {"prompt": "cors", "max_tokens": 2}
    r = httpx.post(f"{base_url}/cors/v1/completions", json=body, headers={"Origin": ORIGIN}, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    # Off by default: the app without allowed_origins sends no CORS headers.
    r = httpx.post(f"{base_url}/v1/completions", json=body, headers={"Origin": ORIGIN}, timeout=10)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers

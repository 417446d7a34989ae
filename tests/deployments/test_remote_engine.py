"""`FailoverStream` without Ray: a scripted handle whose calls yield outputs and then fail as a lost replica
(or as a refusal), to pin down what is resubmitted, when the request is given up, and that the slot is
released exactly once on every path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from ray.exceptions import ActorDiedError

from configs.errors import FieldError
from deployments.engine_server import EngineJob, EngineUnavailable
from deployments.errors import OpenAIError
from deployments.remote_engine import FailoverStream
from engine.request import RequestOutput, SamplingParams

JOB = EngineJob("r1", [5, 6, 7], SamplingParams(max_tokens=6), priority=0)


class _Call:
    """One scripted `generate` call: its outputs, then an exception (or the end)."""

    def __init__(self, outputs: list[RequestOutput], error: BaseException | None) -> None:
        self.outputs, self.error, self.cancelled = outputs, error, False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._run()

    async def _run(self) -> AsyncIterator[RequestOutput]:
        for out in self.outputs:
            await asyncio.sleep(0)
            yield out
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, handle: ScriptedHandle, name: str) -> None:
        self.handle, self.name = handle, name

    def remote(self, *args: Any) -> Any:
        if self.name == "ready":
            return _ready()
        job = args[0]
        self.handle.jobs.append(job)
        outputs, error = self.handle.script.pop(0)
        call = _Call(outputs, error)
        self.handle.calls.append(call)
        return call


async def _ready() -> bool:
    return True


class ScriptedHandle:
    def __init__(self, script: list[tuple[list[RequestOutput], BaseException | None]]) -> None:
        self.script, self.jobs, self.calls = script, [], []  # type: ignore[var-annotated]

    def options(self, **_: Any) -> ScriptedHandle:
        return self

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)


def out(*tokens: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r1", list(tokens), "".join(chr(96 + t) for t in tokens), finished,
                         "length" if finished else None)


class RayTaskErrorLike(Exception):
    """What a handle raises for an exception inside the replica: Ray's task error, with its `cause`."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def run(handle: ScriptedHandle, max_failovers: int = 3, timeout_s: float = 5.0) -> tuple[list[RequestOutput], int]:
    closed = [0]

    def on_close() -> None:
        closed[0] += 1

    async def consume() -> list[RequestOutput]:
        stream = FailoverStream(handle, JOB, on_close, timeout_s, max_failovers, retry_interval_s=0.01)
        return [o async for o in stream]

    return asyncio.run(consume()), closed[0]


def test_a_stream_continues_after_the_tokens_it_has_on_another_replica() -> None:
    lost = ActorDiedError()
    handle = ScriptedHandle([([out(1), out(2)], lost), ([out(3)], lost), ([out(4), out(5, 6, finished=True)], None)])
    outputs, closed = run(handle)
    assert [t for o in outputs for t in o.new_token_ids] == [1, 2, 3, 4, 5, 6]  # nothing lost or repeated
    assert [job.resume_token_ids for job in handle.jobs] == [(), (1, 2), (1, 2, 3)]
    assert all(job.request_id == "r1" and job.params == JOB.params for job in handle.jobs)  # same id: same seed
    assert closed == 1 and all(call.cancelled for call in handle.calls[:2])


def test_a_request_that_kills_every_replica_before_progress_is_given_up() -> None:
    died = RayTaskErrorLike(EngineUnavailable("loop died under it"))
    handle = ScriptedHandle([([], died) for _ in range(3)])
    with pytest.raises(OpenAIError) as e:
        run(handle, max_failovers=2)
    assert e.value.status_code == 503 and "died 3 times before it made progress" in e.value.message
    assert len(handle.jobs) == 3


def test_refusals_by_a_dead_loop_and_progress_do_not_count_against_the_request() -> None:
    refused = RayTaskErrorLike(EngineUnavailable("loop already dead", at_submit=True))
    lost = ActorDiedError()
    script = [([], refused)] * 4 + [([out(1)], lost)] * 4 + [([out(2, finished=True)], None)]
    outputs, closed = run(ScriptedHandle(list(script)), max_failovers=0)
    assert [t for o in outputs for t in o.new_token_ids] == [1, 1, 1, 1, 2] and closed == 1


def test_the_engines_refusal_is_an_openai_error_naming_the_field() -> None:
    for cause, status, param in [(FieldError("request_id", "in use"), 409, "X-Request-Id"),
                                 (FieldError("stop_token_ids", "outside the vocabulary"), 400, "stop_token_ids")]:
        handle = ScriptedHandle([([], RayTaskErrorLike(cause))])
        with pytest.raises(OpenAIError) as e:
            run(handle)
        assert (e.value.status_code, e.value.param) == (status, param)
        assert len(handle.jobs) == 1  # not retried


def test_no_replica_within_the_failover_timeout_is_a_503() -> None:
    handle = ScriptedHandle([([out(1)], ActorDiedError())] + [([], ActorDiedError())] * 1000)
    with pytest.raises(OpenAIError) as e:
        run(handle, max_failovers=10_000, timeout_s=0.3)
    assert e.value.status_code == 503 and "within 0.3 s" in e.value.message


def test_closing_before_reading_cancels_the_call_and_releases_once() -> None:
    handle = ScriptedHandle([([out(1)], None)])
    closed = [0]

    async def close_early() -> None:
        stream = FailoverStream(handle, JOB, lambda: closed.__setitem__(0, closed[0] + 1), 5.0, 3)
        await stream.aclose()
        await stream.aclose()

    asyncio.run(close_early())
    assert closed == [1] and handle.calls[0].cancelled


def test_each_unfinished_choice_continues_after_its_own_tokens_and_finished_ones_are_not_rerun() -> None:
    """n = 3: choice 1 finishes on the first replica; the continuation runs choices 0 and 2 only, each after
    the tokens the client already has of it; the stream ends once every choice has finished."""
    def o(index: int, *tokens: int, finished: bool = False) -> RequestOutput:
        return RequestOutput("r1", list(tokens), "", finished, "length" if finished else None, index=index)

    lost = ActorDiedError()
    job = EngineJob("r1", [5, 6, 7], SamplingParams(max_tokens=4, seed=9, temperature=1.0), n=3)
    first = [o(0, 1), o(1, 11), o(2, 21), o(1, 12, 13, 14, finished=True), o(0, 2)]
    second = [o(2, 22), o(0, 3, 4, finished=True)]
    third = [o(2, 23, 24, finished=True)]
    handle = ScriptedHandle([(first, lost), (second, lost), (third, None)])
    closed = [0]

    async def consume() -> list[RequestOutput]:
        stream = FailoverStream(handle, job, lambda: closed.__setitem__(0, closed[0] + 1), 5.0, 3,
                                retry_interval_s=0.01)
        return [x async for x in stream]

    outputs = asyncio.run(consume())
    got = {i: [t for x in outputs if x.index == i for t in x.new_token_ids] for i in range(3)}
    assert got == {0: [1, 2, 3, 4], 1: [11, 12, 13, 14], 2: [21, 22, 23, 24]}  # nothing lost or repeated
    assert [j.resume for j in handle.jobs] == [None, {0: (1, 2), 2: (21,)}, {2: (21, 22)}]
    assert all(j.n == 3 and j.params == job.params and j.request_id == "r1" for j in handle.jobs)  # same seeds
    assert [x.index for x in outputs if x.finished] == [1, 0, 2] and outputs[-1].finished and closed == [1]

"""AsyncBatonEngine: concurrent submitters (tasks and threads), aborts by closing, cancelling or dropping a
stream, live knobs, fault handling in the loop thread, and a dying loop that ends every open stream."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
from collections.abc import Callable

import pytest

from engine import AsyncBatonEngine
from engine.async_engine import MAX_CONSECUTIVE_FAILURES, kv_cache_usage
from engine.request import RequestOutput, SamplingParams
from tests.helpers import make_engine, run_to_completion

LONG = SamplingParams(max_tokens=900, ignore_eos=True)  # runs for seconds: only an abort ends it early


@pytest.fixture
def front(tiny_model):
    f = AsyncBatonEngine(make_engine(tiny_model, max_batch_size=8))
    f.start()
    try:
        yield f
    finally:
        f.shutdown()


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


async def consume(stream) -> list[RequestOutput]:
    return [out async for out in stream]


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def workload(n_groups: int = 4, per_group: int = 6) -> list[list[tuple[str, list[int], SamplingParams]]]:
    rng = random.Random(7)
    groups = []
    for g in range(n_groups):
        group = []
        for i in range(per_group):
            ids = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 8))]
            params = SamplingParams(max_tokens=rng.randint(2, 8), temperature=rng.choice([0.0, 0.8]),
                                    top_k=20, seed=rng.randrange(10_000), ignore_eos=True)
            group.append((f"g{g}-{i}", ids, params))
        groups.append(group)
    return groups


def test_concurrent_submitters_match_a_synchronous_run(tiny_model, front) -> None:
    groups = workload()
    sync = make_engine(tiny_model, max_batch_size=8)
    for group in groups:
        for rid, ids, params in group:
            sync.add_request(rid, prompt_token_ids=ids, sampling_params=params)
    expected = {rid: tokens_of(outs) for rid, outs in run_to_completion(sync).items()}

    async def submitter(group, delay: float) -> dict[str, list[RequestOutput]]:
        tasks = {}
        for rid, ids, params in group:
            stream = front.submit(rid, prompt_token_ids=ids, sampling_params=params)
            tasks[rid] = asyncio.create_task(consume(stream))
            await asyncio.sleep(delay)  # arrivals spread over iterations
        return {rid: await t for rid, t in tasks.items()}

    thread_result: dict[str, list[RequestOutput]] = {}
    thread_errors: list[BaseException] = []

    def in_thread() -> None:  # a submitter with its own event loop
        try:
            thread_result.update(asyncio.run(submitter(groups[3], 0.003)))
        except BaseException as e:  # surfaced by the assertion below
            thread_errors.append(e)

    async def main() -> list[dict[str, list[RequestOutput]]]:
        return await asyncio.gather(*(submitter(groups[g], 0.001 * (g + 1)) for g in range(3)))

    t = threading.Thread(target=in_thread)
    t.start()
    results = asyncio.run(main())
    t.join(30)
    assert not t.is_alive() and not thread_errors, thread_errors
    got = {rid: outs for r in [*results, thread_result] for rid, outs in r.items()}
    assert set(got) == set(expected)
    for rid, outs in got.items():
        assert tokens_of(outs) == expected[rid], rid
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        assert not any(o.finished for o in outs[:-1])
    assert wait_until(lambda: front.engine.stats.running == 0)


def test_closing_a_stream_aborts_the_request(front) -> None:
    async def main() -> int:
        stream = front.submit("closed", prompt_token_ids=[5, 6, 7], sampling_params=LONG)
        n = 0
        async for out in stream:
            n += len(out.new_token_ids)
            if n >= 3:
                break
        await stream.aclose()
        return n

    n = asyncio.run(main())
    assert n >= 3
    assert wait_until(lambda: front.engine.stats.aborted_requests == 1, timeout=2.0)
    assert wait_until(lambda: front.engine.stats.running == 0, timeout=1.0)
    assert front.engine.stats.generated_tokens < LONG.max_tokens


def test_cancelling_the_consumer_aborts_the_request(front) -> None:
    async def main() -> None:
        stream = front.submit("cancelled", prompt_token_ids=[9, 10], sampling_params=LONG)
        first = asyncio.Event()

        async def consumer() -> None:
            async for _ in stream:
                first.set()

        task = asyncio.create_task(consumer())
        await asyncio.wait_for(first.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert wait_until(lambda: front.engine.stats.aborted_requests == 1, timeout=2.0)
    assert wait_until(lambda: front.engine.stats.running == 0, timeout=1.0)
    assert front.engine.stats.generated_tokens < LONG.max_tokens


def test_submit_validates_synchronously(front) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="prompt must be a non-empty string"):
            front.submit("bad", prompt="")
        with pytest.raises(ValueError, match="outside the vocabulary"):
            front.submit("bad", prompt_token_ids=[10**9])
        stream = front.submit("dup", prompt_token_ids=[5], sampling_params=LONG)
        with pytest.raises(ValueError, match="duplicate request id 'dup'"):
            front.submit("dup", prompt_token_ids=[6])
        await stream.aclose()
        # Closing the stream frees the id at once (a client retrying with its own id must not race the engine
        # loop); the engine still drops the old request before it sees the new one.
        again = front.submit("dup", prompt_token_ids=[6], sampling_params=SamplingParams(max_tokens=2))
        outs = await consume(again)
        assert outs[-1].finish_reason in ("length", "stop")
        assert outs[0].request_id == "dup" and all(o.finish_reason != "abort" for o in outs)
        assert wait_until(lambda: front.engine.stats.aborted_requests == 1)

    asyncio.run(main())


def test_update_controller_applies_live_knobs(front) -> None:
    with pytest.raises(ValueError, match="unknown live knob"):
        front.update_controller(max_batch_sise=3)
    with pytest.raises(ValueError):
        front.update_controller(max_batch_size=0)
    assert front.config.max_batch_size == 8
    front.update_controller(max_batch_size=3)
    assert wait_until(lambda: front.config.max_batch_size == 3)
    assert front.metrics()["max_batch_size"] == 3.0
    start = front.engine.stats.iterations

    async def main() -> None:
        streams = [front.submit(f"k{i}", prompt_token_ids=[5 + i], sampling_params=SamplingParams(
            max_tokens=6, ignore_eos=True)) for i in range(7)]
        for outs in await asyncio.gather(*(consume(s) for s in streams)):
            assert outs[-1].finish_reason == "length"

    asyncio.run(main())
    rows = [it.rows for it in front.engine.stats.history[start:]]
    assert max(rows) == 3  # the batch filled up to the new limit, never past it


def test_a_failed_batch_fails_its_requests_and_the_engine_keeps_serving(tiny_model, front,
                                                                       monkeypatch) -> None:
    runner = front.engine.runner
    real_forward = runner.batch_forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected device fault")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(runner, "batch_forward", flaky)
    params = SamplingParams(max_tokens=5, temperature=0.8, seed=3, ignore_eos=True)

    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        failed = await consume(front.submit("victim", prompt_token_ids=[5, 6], sampling_params=params))
        ok = await consume(front.submit("later", prompt_token_ids=[5, 6], sampling_params=params))
        return failed, ok

    failed, ok = asyncio.run(main())
    assert failed[-1].finished and failed[-1].finish_reason == "error"
    assert "injected device fault" in (failed[-1].error or "")
    sync = make_engine(tiny_model)
    sync.add_request("later", prompt_token_ids=[5, 6], sampling_params=params)
    assert ok[-1].finish_reason == "length"
    assert tokens_of(ok) == tokens_of(run_to_completion(sync)["later"])
    assert front.is_healthy()


def test_a_failed_iteration_fails_what_was_in_flight_and_keeps_serving(front, monkeypatch) -> None:
    real_step = front.engine.step
    calls = {"n": 0}

    def flaky_step(**kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected loop fault")
        return real_step(**kwargs)

    monkeypatch.setattr(front.engine, "step", flaky_step)
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    async def main() -> tuple[list[RequestOutput], list[RequestOutput]]:
        failed = await consume(front.submit("x", prompt_token_ids=[5], sampling_params=params))
        ok = await consume(front.submit("y", prompt_token_ids=[5], sampling_params=params))
        return failed, ok

    failed, ok = asyncio.run(main())
    assert failed[-1].finish_reason == "error" and "injected loop fault" in (failed[-1].error or "")
    assert ok[-1].finish_reason == "length" and len(tokens_of(ok)) == 4
    assert front.is_healthy()
    assert front.engine.stats.running == 0 and not front.engine.has_unfinished_requests()


def test_repeated_failures_make_the_front_unhealthy(front, monkeypatch) -> None:
    def broken_step(**kwargs):
        raise RuntimeError("always broken")

    monkeypatch.setattr(front.engine, "step", broken_step)

    async def main() -> list[RequestOutput]:
        finals = []
        for i in range(MAX_CONSECUTIVE_FAILURES):
            outs = await consume(front.submit(f"f{i}", prompt_token_ids=[5]))
            finals.append(outs[-1])
        return finals

    finals = asyncio.run(main())
    assert all(o.finished and o.finish_reason == "error" for o in finals)
    assert wait_until(lambda: not front.is_healthy())
    assert isinstance(front.last_error, RuntimeError)

    async def submit_again() -> None:
        with pytest.raises(RuntimeError, match="not running"):
            front.submit("late", prompt_token_ids=[5])

    asyncio.run(submit_again())


def test_engine_is_built_on_the_loop_thread_and_build_failures_surface_in_start(tiny_model) -> None:
    """All torch work of a front built with `build=` happens on its loop thread (one OpenMP pool on CPU)."""
    built_on: list[str] = []

    def build():  # type: ignore[no-untyped-def]
        built_on.append(threading.current_thread().name)
        return make_engine(tiny_model, max_batch_size=2)

    f = AsyncBatonEngine(build=build)
    with pytest.raises(RuntimeError, match="call start"):
        _ = f.engine
    f.start()
    try:
        assert built_on == ["baton-engine-loop"] and f.is_healthy()

        async def main() -> None:
            outs = await consume(f.submit("b", prompt_token_ids=[5], sampling_params=SamplingParams(max_tokens=3)))
            assert outs[-1].finished

        asyncio.run(main())
    finally:
        f.shutdown()

    def broken():  # type: ignore[no-untyped-def]
        raise ValueError("model 'nope' not found")

    bad = AsyncBatonEngine(build=broken)
    with pytest.raises(RuntimeError, match="could not be built: model 'nope' not found"):
        bad.start()
    assert not bad.is_healthy()
    with pytest.raises(ValueError, match="exactly one"):
        AsyncBatonEngine()


class LoopKilled(BaseException):
    """Not an Exception: escapes every `except Exception` in the loop body."""


def kill_loop_in_step(front: AsyncBatonEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    def step(**kwargs):  # type: ignore[no-untyped-def]
        raise LoopKilled("step killed")

    monkeypatch.setattr(front.engine, "step", step)


def kill_loop_in_recovery(front: AsyncBatonEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """An ordinary exception that escapes the loop body: failing the requests after a fault fails too."""

    def step(**kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("device fault")

    def fail_all(message: str):  # type: ignore[no-untyped-def]
        raise RuntimeError("recovery failed too")

    monkeypatch.setattr(front.engine, "fail_all", fail_all)
    monkeypatch.setattr(front.engine, "step", step)


@pytest.mark.parametrize("kill", [kill_loop_in_step, kill_loop_in_recovery])
def test_a_dying_loop_ends_every_open_stream_with_an_error(front, monkeypatch, kill) -> None:
    async def main() -> list[RequestOutput]:
        streams = [front.submit(f"open{i}", prompt_token_ids=[5 + i], sampling_params=LONG) for i in range(3)]
        for s in streams[:2]:  # two running, one maybe still queued: all must end
            await anext(s)
        kill(front, monkeypatch)
        finals = [(await asyncio.wait_for(consume(s), 10))[-1] for s in streams]
        with pytest.raises(RuntimeError, match="not running"):
            front.submit("late", prompt_token_ids=[5])
        return finals

    finals = asyncio.run(main())
    assert all(o.finished and o.finish_reason == "error" and "engine loop died" in (o.error or "")
               for o in finals), finals
    assert not front.is_healthy()


def test_closing_a_stream_after_the_loop_died_returns(front, monkeypatch) -> None:
    """aclose() waits for the engine to drop the request; a dead loop drops nothing, and must not hang it."""

    async def main() -> None:
        stream = front.submit("c", prompt_token_ids=[5], sampling_params=LONG)
        await anext(stream)
        kill_loop_in_step(front, monkeypatch)
        assert wait_until(lambda: not front.is_healthy())
        await asyncio.wait_for(stream.aclose(), 5)

    asyncio.run(main())


def test_a_stream_dropped_unconsumed_frees_its_slot_and_its_row(front) -> None:
    closed: list[str] = []

    async def main() -> None:
        stream = front.submit("dropped", prompt_token_ids=[5, 6], sampling_params=LONG,
                              on_close=lambda: closed.append("dropped"))
        assert wait_until(lambda: front.engine.stats.running == 1)
        assert closed == []
        del stream  # never read: only the garbage collector knows the consumer is gone
        gc.collect()
        assert closed == ["dropped"]  # at once, exactly once

    asyncio.run(main())
    assert wait_until(lambda: front.engine.stats.aborted_requests == 1, timeout=2.0)
    assert wait_until(lambda: front.engine.stats.running == 0 and not front.engine.has_unfinished_requests())
    assert closed == ["dropped"]


def test_on_close_runs_once_on_every_way_a_stream_ends(front) -> None:
    closed: list[str] = []

    def closer(name: str) -> Callable[[], None]:
        return lambda: closed.append(name)

    async def main() -> None:
        short = SamplingParams(max_tokens=2, ignore_eos=True)
        done = front.submit("done", prompt_token_ids=[5], sampling_params=short, on_close=closer("done"))
        await consume(done)
        shut = front.submit("shut", prompt_token_ids=[5], sampling_params=LONG, on_close=closer("shut"))
        await anext(shut)
        await shut.aclose()
        await shut.aclose()
        cancelled = front.submit("cancel", prompt_token_ids=[5], sampling_params=LONG, on_close=closer("cancel"))
        task = asyncio.create_task(consume(cancelled))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert sorted(closed) == ["cancel", "done", "shut"]


def test_closing_a_finished_stream_late_leaves_a_new_request_with_its_id_alone(front) -> None:
    """The old stream's abort names the old stream: it cannot abort the id's next request."""

    async def main() -> list[RequestOutput]:
        old = front.submit("same", prompt_token_ids=[5], sampling_params=SamplingParams(max_tokens=1))
        assert wait_until(lambda: front.engine.stats.finished_requests == 1)  # final output not read yet
        new = front.submit("same", prompt_token_ids=[6], sampling_params=SamplingParams(max_tokens=4,
                                                                                        ignore_eos=True))
        await old.aclose()
        return await consume(new)

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "length" and len(tokens_of(outs)) == 4
    assert front.engine.stats.aborted_requests == 0


def test_shutdown_ends_open_streams(tiny_model) -> None:
    f = AsyncBatonEngine(make_engine(tiny_model, max_batch_size=2))
    f.start()

    async def main() -> RequestOutput:
        stream = f.submit("s", prompt_token_ids=[5], sampling_params=LONG)
        await anext(stream)
        await asyncio.to_thread(f.shutdown)
        return (await asyncio.wait_for(consume(stream), 5))[-1]

    final = asyncio.run(main())
    assert final.finish_reason == "error" and "shut down" in (final.error or "")


def test_kv_cache_usage_is_cached_tokens_over_capacity(tiny_model) -> None:
    engine = make_engine(tiny_model, max_batch_size=4)
    assert kv_cache_usage(engine.cache) == 0.0
    for i in range(3):
        engine.add_request(f"u{i}", prompt_token_ids=[5] * (4 + 8 * i), sampling_params=LONG)
    for _ in range(3):
        engine.step()
    cache = engine.cache
    tokens = sum(cache.real)
    assert tokens == sum(4 + 8 * i + 2 for i in range(3))  # prompt + generated, but the newest token
    capacity = cache.reserved_bytes() / cache.bytes_per_token  # the mask's bytes make this a bit more
    assert kv_cache_usage(cache) == pytest.approx(tokens / capacity)
    assert 0 < kv_cache_usage(cache) < 1
    for i in range(3):
        engine.abort_request(f"u{i}")
    assert kv_cache_usage(engine.cache) == 0.0


def test_a_close_left_waiting_when_its_event_loop_ends_does_not_hurt_the_loop_thread(front) -> None:
    """aclose() waits for the drop; if its event loop closes first, answering it must not raise in the
    engine's loop thread (which would end every other stream)."""

    async def main() -> None:
        stream = front.submit("left", prompt_token_ids=[5], sampling_params=LONG)
        await anext(stream)
        asyncio.get_running_loop().create_task(stream.aclose())
        await asyncio.sleep(0)  # the abort is posted; asyncio.run now cancels the wait and closes the loop

    asyncio.run(main())
    assert wait_until(lambda: front.engine.stats.aborted_requests == 1)
    assert front.is_healthy()

    async def again() -> list[RequestOutput]:
        return await consume(front.submit("after", prompt_token_ids=[5], sampling_params=SamplingParams(
            max_tokens=2, ignore_eos=True)))

    assert asyncio.run(again())[-1].finish_reason == "length"


# ---- first tokens go out before the batch forward -------------------------------------------------------------
def _mixed_requests(engine) -> None:
    """Joins, pooled prefills, a one-token request, n=2, logprobs and prompt logprobs, a chunked long prompt."""
    rng = random.Random(11)
    for i in range(10):
        ids = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 12))]
        params = SamplingParams(max_tokens=rng.choice([1, 3, 7]), temperature=rng.choice([0.0, 0.9]), seed=i,
                                ignore_eos=True, logprobs=2 if i % 3 == 0 else None,
                                prompt_logprobs=1 if i % 4 == 1 else None)
        engine.enqueue_all(engine.make_choices(f"r{i}", None, ids, params, 0, 2 if i == 5 else 1, ()))
    engine.add_request("long", prompt_token_ids=[rng.randrange(3, 49152) for _ in range(40)],
                       sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))


def test_step_with_emit_hands_out_the_same_outputs_in_two_parts(tiny_model) -> None:
    """`step(emit=...)`: what is emitted before the batch forward plus what is returned equals, request by
    request, what a step without `emit` returns; and prefills' first tokens do come out early."""
    plain = make_engine(tiny_model, max_batch_size=4, prefill_token_budget=24, prefill_chunk_tokens=16)
    split = make_engine(tiny_model, max_batch_size=4, prefill_token_budget=24, prefill_chunk_tokens=16)
    _mixed_requests(plain)
    _mixed_requests(split)
    expected = run_to_completion(plain)
    got: dict[str, list[RequestOutput]] = {}
    early: list[RequestOutput] = []

    def keep(outs: list[RequestOutput]) -> None:
        for o in outs:
            got.setdefault(o.request_id, []).append(o)

    def emit(outs: list[RequestOutput]) -> None:
        early.extend(outs)
        keep(outs)

    while split.has_unfinished_requests():
        keep(split.step(emit=emit))
    assert len({o.request_id for o in early if o.new_token_ids}) == 11  # every first token went out early
    assert sorted(got) == sorted(expected)
    for rid, outs in expected.items():
        for o in (outs, got[rid]):
            assert [x.finished for x in o].count(True) == (2 if rid == "r5" else 1), rid
        def by_choice(outs: list[RequestOutput]) -> dict[int, tuple]:
            return {i: (tokens_of([o for o in outs if o.index == i]),
                        "".join(o.text for o in outs if o.index == i),
                        [o.finish_reason for o in outs if o.index == i and o.finished],
                        [lp for o in outs if o.index == i for lp in (o.logprobs or [])],
                        [o.prompt_logprobs for o in outs if o.index == i and o.prompt_logprobs is not None])
                    for i in {o.index for o in outs}}
        assert by_choice(got[rid]) == by_choice(outs), rid
    assert split.stats.generated_tokens == plain.stats.generated_tokens


def test_a_prompts_first_token_goes_out_while_the_batch_forward_still_runs(tiny_model, front) -> None:
    """B arrives while A decodes. The batch forward of the iteration whose prefill drew B's first token is
    held: B's first token has reached B's consumer meanwhile. B's tokens are then those of a solo run."""
    runner = front.engine.runner
    forward, prefills = runner.batch_forward, runner._prefills
    b_prefilled, held, release = threading.Event(), threading.Event(), threading.Event()

    def watched(plan_prefills, *args, **kwargs):
        if any(p.request_id == "B" for p in plan_prefills):
            b_prefilled.set()
        return prefills(plan_prefills, *args, **kwargs)

    def gated(cache, *args, **kwargs):
        if b_prefilled.is_set() and not release.is_set():  # the batch forward of B's prefill's iteration
            held.set()
            release.wait(timeout=30)
        return forward(cache, *args, **kwargs)

    runner._prefills, runner.batch_forward = watched, gated
    params = SamplingParams(max_tokens=6, ignore_eos=True)

    async def run() -> tuple[RequestOutput, list[RequestOutput]]:
        a = front.submit("A", prompt_token_ids=[5, 6, 7], sampling_params=LONG)
        await a.__anext__()  # A is in the batch
        b = front.submit("B", prompt_token_ids=[9, 8, 7, 6], sampling_params=params)
        try:
            first = await asyncio.wait_for(b.__anext__(), timeout=10)
            assert await asyncio.to_thread(held.wait, 10)  # that iteration's batch forward started ...
            assert not release.is_set()  # ... and cannot have finished: B's first token came before its end
        finally:
            release.set()
        rest = [out async for out in b]
        await a.aclose()
        return first, rest

    first, rest = asyncio.run(run())
    assert first.new_token_ids and not first.finished
    solo = make_engine(tiny_model, max_batch_size=8)
    solo.add_request("B", prompt_token_ids=[9, 8, 7, 6], sampling_params=params)
    assert tokens_of([first, *rest]) == tokens_of(run_to_completion(solo)["B"])

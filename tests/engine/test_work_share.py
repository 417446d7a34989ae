"""The kernels' work-sharing pool (engine/kernels/work_share.cpp, engine/threads.py): the same bits as torch's
OpenMP threads whoever computes a chunk, nothing lost or run twice, and whole generations unchanged by it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from engine import cpu_kernel
from engine.request import SamplingParams
from engine.threads import ComputeThreads
from tests.helpers import make_engine, run_to_completion


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if cpu_kernel.work_share() is not None:
        cpu_kernel.set_share_workers(1)


@pytest.fixture(scope="module")
def pool() -> None:
    if cpu_kernel.work_share() is None:
        pytest.skip(f"no work-sharing pool here: {cpu_kernel.why_not_share()}")


def _counts() -> list[int]:
    """jobs, chunks, chunks run by helpers, caller sleeps, helper sleeps, stalls, ns in jobs, ns waiting for helpers,
    jobs that waited (cumulative; cpu_kernel.SHARE_STATS)."""
    return list(torch.ops.baton_share.stats())


def _kernels() -> list[tuple[str, object, torch.dtype]]:
    out = []
    if cpu_kernel.skinny_linear() is not None:
        out.append(("avx2", torch.ops.baton.skinny_linear, torch.float32))
    if cpu_kernel.skinny_linear_avx512() is not None:
        out += [("avx512", torch.ops.baton_avx512.skinny_linear, torch.float32),
                ("avx512", torch.ops.baton_avx512.skinny_linear, torch.bfloat16)]
    return out


def test_linears_through_the_pool_are_bit_identical_and_helpers_take_part(pool) -> None:
    """Every linear kernel, decode and prompt shapes (out % 4 != 0 and 49,152 rows of weights included): the pool
    with a helper gives exactly the bits of one thread and of two OpenMP threads, and over many calls the helper
    ran a share of the chunks (so the pool, not the fallback, was measured). Fails if a chunk were skipped, run
    twice, or split differently inside."""
    kernels = _kernels()
    if not kernels:
        pytest.skip("no compiled linear kernel here")
    torch.manual_seed(3)
    cases = [(name, op, torch.randn(rows, inp).to(dtype), torch.randn(out, inp).to(dtype))
             for name, op, dtype in kernels
             for rows, inp, out in ((16, 576, 1536), (5, 1536, 575), (1, 576, 192), (48, 576, 49152), (200, 96, 303))]
    alone = []
    for name, op, x, w in cases:
        torch.set_num_threads(1)
        cpu_kernel.set_share_workers(1)
        alone.append(op(x, w))
        torch.set_num_threads(2)  # OpenMP's threads spin a while after it, so the pool's passes come after all these
        assert torch.equal(alone[-1], op(x, w)), (name, x.dtype, x.shape, w.shape)
    torch.set_num_threads(1)
    cpu_kernel.set_share_workers(2)
    passes = 0
    while True:  # the SCHED_IDLE helper runs only on idle CPU time: a busy neighbour (another test worker) may delay it
        passes += 1
        before = _counts()
        for (name, op, x, w), expected in zip(cases, alone, strict=True):
            assert all(torch.equal(expected, op(x, w)) for _ in range(10)), (name, x.dtype, x.shape, w.shape)
        jobs, chunks, helpers = (b - a for a, b in zip(before[:3], _counts()[:3], strict=True))
        assert jobs > 0 and helpers < chunks, (jobs, chunks, helpers)
        if helpers > 0 or passes == 40:
            break
        time.sleep(0.05)
    assert helpers > 0, f"the helper took no chunk in {passes} passes"


def _helper_tids() -> list[int]:
    import os

    tids = []
    for name in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{name}/comm") as f:
                if f.read().strip() == "baton-share":
                    tids.append(int(name))
        except OSError:  # the thread has ended
            pass
    return tids


def test_the_callers_wait_for_a_preempted_helper_is_counted(pool) -> None:
    """The caller on one CPU, its SCHED_IDLE helper on another kept busy by a spinning process: the helper runs only
    in the slivers Linux gives idle tasks, so a chunk it takes is often left half-done, and the caller must wait for
    it. `wait_ns` (what /stats reports as share_wait_seconds_total) must count that time; the results stay exact; the
    counters stay consistent (the time waiting within the time in jobs, within the wall time; no more waiting jobs
    than jobs). Fails if the wait or the job time were not counted, or counted outside the job."""
    import os
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    if cpu_kernel.skinny_linear_avx512() is None and cpu_kernel.skinny_linear() is None:
        pytest.skip("no compiled linear kernel here")
    op = (torch.ops.baton_avx512 if cpu_kernel.skinny_linear_avx512() is not None else torch.ops.baton).skinny_linear
    torch.manual_seed(5)
    x, w = torch.randn(16, 576), torch.randn(1536, 576)
    expected = op(x, w)
    cpu_kernel.set_share_workers(2)
    op(x, w)  # the helper exists before the pinning
    helpers = _helper_tids()
    assert helpers, "no helper thread named baton-share"
    mine, theirs = {cpus[0]}, {cpus[1]}
    saved = {tid: os.sched_getaffinity(tid) for tid in [threading.get_native_id(), *helpers]}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, theirs)
        os.sched_setaffinity(threading.get_native_id(), mine)
        for tid in helpers:
            os.sched_setaffinity(tid, theirs)
        before, t0 = cpu_kernel.share_stats(), time.perf_counter()
        while time.perf_counter() - t0 < 30 and cpu_kernel.share_stats()["waits"] == before["waits"]:
            for _ in range(50):
                assert torch.equal(op(x, w), expected)
        wall_ns = (time.perf_counter() - t0) * 1e9
        after = cpu_kernel.share_stats()
    finally:
        busy.kill()
        busy.wait()
        for tid, mask in saved.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass
    jobs, job_ns, wait_ns, waits = (after[k] - before[k] for k in ("jobs", "job_ns", "wait_ns", "waits"))
    assert jobs > 0 and 0 < job_ns <= wall_ns, (jobs, job_ns, wall_ns)
    assert waits > 0, "in 30 s the busy helper never held a chunk the caller had to wait for"
    assert 0 < wait_ns <= job_ns and waits <= jobs, (wait_ns, job_ns, waits, jobs)
    raw = _counts()  # the named view reads the operator's counters, in SHARE_STATS' order
    assert raw[cpu_kernel.SHARE_STATS.index("wait_ns")] >= after["wait_ns"] and raw[0] >= after["jobs"]


def test_attention_through_the_pool_is_bit_identical(pool) -> None:
    """The decode attention kernel's (row, key/value head) tasks through the pool: the same bits as one thread,
    on a left-padded batch of uneven rows."""
    if cpu_kernel.decode_attention() is None:
        pytest.skip("no attention kernel here")
    torch.manual_seed(4)
    for dtype in (torch.float32, torch.bfloat16):
        rows, heads, kv_heads, width, dim = 16, 9, 3, 300, 64
        q = torch.randn(rows, heads, 1, dim).to(dtype)
        k, v = torch.randn(rows, kv_heads, width, dim).to(dtype), torch.randn(rows, kv_heads, width, dim).to(dtype)
        starts = torch.randint(0, width - 1, (rows,))
        mask = (torch.arange(width)[None, :] >= starts[:, None])[:, None, :]
        op = torch.ops.baton_attention.decode_attention
        torch.set_num_threads(1)
        cpu_kernel.set_share_workers(1)
        alone = op(q, k, v, mask, 0.125)
        cpu_kernel.set_share_workers(2)
        assert all(torch.equal(alone, op(q, k, v, mask, 0.125)) for _ in range(20)), dtype


def test_callers_on_several_threads_get_their_own_results(pool) -> None:
    """Two threads calling kernels at once (one job runs on the pool, the other inline): each gets exactly its own
    product, and nothing hangs."""
    kernels = _kernels()
    if not kernels:
        pytest.skip("no compiled linear kernel here")
    _, op, dtype = kernels[-1]
    torch.manual_seed(5)
    cases = [(torch.randn(16, 576).to(dtype), torch.randn(1536 + 4 * i, 576).to(dtype)) for i in range(2)]
    torch.set_num_threads(1)
    expected = [op(x, w) for x, w in cases]
    cpu_kernel.set_share_workers(2)
    wrong: list[int] = []

    def call(i: int) -> None:
        x, w = cases[i]
        for _ in range(200):
            if not torch.equal(op(x, w), expected[i]):
                wrong.append(i)

    workers = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in workers) and wrong == []


def test_compute_threads_apply_only_inside_an_iteration(pool) -> None:
    """Shared mode: inside an iteration torch runs on one thread (no OpenMP thread spinning beside the pool's
    helper), a captured decode step on the pool's n workers, any other forward on n of torch's threads, each back to
    the state before it; outside, torch keeps the caller's count, so a second engine built later in the process
    reads the configured count, not one."""
    torch.set_num_threads(2)
    threads = ComputeThreads.build(2, work_sharing=True)
    assert threads.shared and torch.get_num_threads() == 2 and cpu_kernel.share_workers() == 1
    with threads.iteration():
        assert torch.get_num_threads() == 1
        with threads.forward(2, pooled=True):
            assert cpu_kernel.share_workers() == 2 and torch.get_num_threads() == 1
        with threads.forward(2, pooled=False):
            assert cpu_kernel.share_workers() == 1 and torch.get_num_threads() == 2
            with threads.forward(2):
                pass
            assert torch.get_num_threads() == 2  # nested: back to the outer forward's count
        assert torch.get_num_threads() == 1 and cpu_kernel.share_workers() == 1
    assert torch.get_num_threads() == 2
    assert not ComputeThreads.build(2, work_sharing=False).shared
    assert not ComputeThreads.build(1, work_sharing=True).shared


@pytest.mark.parametrize("model", ["default_model", "default_model_bf16"])
def test_generations_with_the_pool_equal_those_without(model: str, request: pytest.FixtureRequest, pool) -> None:
    """The default model at 2 threads, greedy and sampled requests of different lengths batched together: the
    engine with work sharing (its captured decode steps on the pool) gives every token it gives with OpenMP
    threads, in float32 and in bfloat16, and its steps did run on the pool."""
    loaded = request.getfixturevalue(model)
    prompts = {f"r{i}": [300 + 41 * i + k for k in range(3 + 9 * i)] for i in range(5)}

    torch.set_num_threads(2)

    def generate(sharing: bool) -> dict[str, list[int]]:
        engine = make_engine(loaded, max_batch_size=8, work_sharing=sharing, adaptive_threads=False)
        assert torch.get_num_threads() == 2  # an engine leaves torch's count as it found it
        assert engine.runner.threads.shared is (sharing and engine.runner.captured is not None)
        shared.append(engine.runner.threads.shared)
        for i, (rid, ids) in enumerate(prompts.items()):
            params = SamplingParams(max_tokens=10 + 3 * i, ignore_eos=True, temperature=0.0 if i % 2 else 0.8,
                                    seed=i)
            engine.add_request(rid, prompt_token_ids=ids, sampling_params=params)
        outs = run_to_completion(engine)
        assert torch.get_num_threads() == 2
        return {rid: [t for o in outs[rid] for t in o.new_token_ids] for rid in prompts}

    shared: list[bool] = []
    without = generate(sharing=False)
    before = _counts()
    with_pool = generate(sharing=True)
    jobs = _counts()[0] - before[0]
    assert with_pool == without
    assert shared[0] is False and (jobs > 0 if shared[1] else jobs == 0)  # the decode steps ran on the pool

"""The decode steps' thread count: chosen by measuring, and never a cause of different tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine.host_load import OtherLoad
from engine.request import SamplingParams
from engine.thread_tuner import ThreadTuner
from engine.threads import ComputeThreads
from tests.helpers import make_engine, run_to_completion


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


QUIET = {2: 1.0, 1: 1.0}  # each step's CPU share by thread count: every thread ran the whole step
BUSY_CORE = {2: 0.72, 1: 1.0}  # another process took a core: two threads got ~3/4 of their time


def drive(tuner: ThreadTuner, step_s: dict[int, float], steps: int, share: dict[int, float]) -> list[int]:
    """Run `steps` decode steps whose time and CPU share depend only on the thread count; the counts used."""
    used = []
    for _ in range(steps):
        n = tuner.before()
        used.append(n)
        tuner.after(step_s[n], share[n] * step_s[n] * n)  # the process's CPU seconds over the step
    return used


def test_quiet_never_tries_one_thread() -> None:
    """Every trial step of one thread is lost when two are faster: with the CPU share high, none is run."""
    tuner = ThreadTuner(most=2, period=10, trial=2)
    used = drive(tuner, {2: 0.060, 1: 0.095}, steps=200, share=QUIET)
    assert used == [2] * 200 and tuner.trials == 0 and tuner.current == 2


def test_contention_moves_to_one_thread_and_back_when_it_ends() -> None:
    tuner = ThreadTuner(most=2, period=10, trial=2)
    drive(tuner, {2: 0.200, 1: 0.100}, steps=30, share=BUSY_CORE)  # two threads collapse
    assert tuner.current == 1 and tuner.switches == 1
    used = drive(tuner, {2: 0.200, 1: 0.100}, steps=30, share=BUSY_CORE)
    assert 2 in used and used.count(2) <= 2 * 2 and tuner.current == 1  # only trials run on 2 threads
    drive(tuner, {2: 0.060, 1: 0.095}, steps=60, share=QUIET)  # the core is back
    assert tuner.current == 2 and tuner.switches == 2


def test_trials_that_lose_grow_rarer() -> None:
    """Beside a light load the share is low but two threads still win: each losing trial doubles the period,
    up to `longest`, so the trials' cost fades instead of recurring every `period` steps."""
    tuner = ThreadTuner(most=2, period=10, trial=2, longest=80, first=10)
    used = drive(tuner, {2: 0.060, 1: 0.080}, steps=600, share={2: 0.75, 1: 1.0})
    starts = [i for i in range(1, len(used)) if used[i] == 1 and used[i - 1] == 2]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert tuner.current == 2 and tuner.switches == 0
    assert gaps[:3] == [22, 42, 82] and set(gaps[3:]) == {82}  # 20, 40, 80 steps at two threads + the trial


def test_contention_after_a_long_quiet_stretch_is_tried_at_once() -> None:
    tuner = ThreadTuner(most=2, period=10, trial=3)
    drive(tuner, {2: 0.060, 1: 0.095}, steps=500, share=QUIET)
    used = drive(tuner, {2: 0.200, 1: 0.100}, steps=12, share=BUSY_CORE)
    assert used.index(1) <= 5 and tuner.current == 1  # once most of the recent shares are low


def test_prompt_forwards_beside_a_busy_core_move_to_one_thread_before_any_decode_step() -> None:
    """A burst's prompts come first: two prompt forwards at all threads with a low CPU share switch at once (no
    trial), and the decode steps then start on one thread; a share at or above `drop` (a Serve replica's
    neighbours), a forward too short to say anything, or prompts that ran on one thread change nothing."""
    tuner = ThreadTuner(most=2, period=10, trial=3)
    tuner.prompts(0.5, 0.5 * 2 * 0.73, threads=2)
    assert tuner.current == 2  # one forward is not enough
    tuner.prompts(0.4, 0.4 * 2 * 0.70, threads=2)
    assert tuner.current == 1 and tuner.switches == 1 and tuner.trials == 0
    assert drive(tuner, {2: 0.200, 1: 0.100}, steps=5, share=BUSY_CORE) == [1] * 5

    for share, seconds, threads in ((0.85, 0.5, 2), (0.5, 0.01, 2), (0.5, 0.5, 1)):
        calm = ThreadTuner(most=2, period=10, trial=3)
        for _ in range(5):
            calm.prompts(seconds, seconds * threads * share, threads=threads)
        assert calm.current == 2 and calm.switches == 0, (share, seconds, threads)


def test_the_choice_never_leaks_outside_the_decode_step() -> None:
    """The tuner only answers (`before()`); the runner applies the count for the decode step alone, so prefills
    and any other engine in the process see the configured count, whatever the tuner chose."""
    torch.set_num_threads(2)
    tuner = ThreadTuner(most=2, period=4, trial=1, first=1)
    drive(tuner, {2: 0.200, 1: 0.100}, steps=12, share=BUSY_CORE)
    assert tuner.current == 1 and tuner.before() == 1 and torch.get_num_threads() == 2
    threads = ComputeThreads(most=2, shared=False)
    with threads.forward(tuner.before(), pooled=True):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_one_slow_trial_step_decides_nothing() -> None:
    tuner = ThreadTuner(most=2, period=5, trial=3)
    times = iter([0.06] * 5 + [0.01, 0.2, 0.2] + [0.06] * 20)  # the trial's median is slow
    for _ in range(28):
        n = tuner.before()
        t = next(times)
        tuner.after(t, 0.7 * t * n)
    assert tuner.trials >= 1 and tuner.current == 2 and tuner.switches == 0


@pytest.mark.parametrize("model", ["default_model", "default_model_bf16"])
def test_switching_threads_mid_run_changes_no_token(model: str, request: pytest.FixtureRequest) -> None:
    """Greedy generations with a tuner that switches between 1 and 2 threads every couple of steps equal the
    same generations at a fixed 2 threads, in float32 and in bfloat16 (the preset's `dtype: auto` here): a
    row's maths does not depend on the thread count."""
    default_model = request.getfixturevalue(model)
    prompts = {f"r{i}": [200 + 37 * i + k for k in range(5 + 7 * i)] for i in range(4)}
    params = SamplingParams(max_tokens=16, ignore_eos=True)

    def generate(adaptive: bool) -> tuple[dict[str, list[int]], int]:
        torch.set_num_threads(2)
        engine = make_engine(default_model, max_batch_size=4, adaptive_threads=adaptive)
        if adaptive:
            assert engine.runner.tuner is not None
            engine.runner.tuner = ThreadTuner(most=2, period=2, trial=1, margin=1e9, first=2, gate=2.0)  # always switches
        for rid, ids in prompts.items():
            engine.add_request(rid, prompt_token_ids=ids, sampling_params=params)
        outs = run_to_completion(engine)
        switches = engine.runner.tuner.switches if engine.runner.tuner else 0
        return {rid: [t for o in outs[rid] for t in o.new_token_ids] for rid in prompts}, switches

    fixed, _ = generate(adaptive=False)
    switched, switches = generate(adaptive=True)
    assert switches >= 4
    assert switched == fixed


class FakeLoad(OtherLoad):
    """Other processes' busy cores, as the test sets them."""

    def __init__(self, cores: float | None) -> None:
        self.value = cores
        self.samples = 0

    def sample(self) -> None:
        self.samples += 1

    def clear(self) -> None:
        pass

    def cores(self) -> float | None:
        return self.value


def test_one_thread_tries_all_again_only_once_the_other_processes_let_go() -> None:
    load = FakeLoad(1.0)  # a busy process holds a core
    tuner = ThreadTuner(most=2, period=10, trial=2, load=load)
    drive(tuner, {2: 0.200, 1: 0.100}, steps=30, share=BUSY_CORE)
    assert tuner.current == 1 and 0 < load.samples < 30  # read only at one thread
    trials = tuner.trials
    assert drive(tuner, {2: 0.200, 1: 0.100}, steps=300, share=BUSY_CORE) == [1] * 300  # no trial would pay
    assert tuner.trials == trials
    load.value = 0.0  # it stopped
    used = drive(tuner, {2: 0.060, 1: 0.095}, steps=6, share=QUIET)
    assert used[0] == 2 and tuner.current == 2 and tuner.switches == 2
    load.value = None  # unknown: trials on the period, as without a load
    tuner = ThreadTuner(most=2, period=10, trial=2, load=load)
    drive(tuner, {2: 0.200, 1: 0.100}, steps=30, share=BUSY_CORE)
    assert 2 in drive(tuner, {2: 0.200, 1: 0.100}, steps=30, share=BUSY_CORE)


def _stat(path: Path, busy_ticks: int, idle_ticks: int, cpus: int) -> None:
    lines = [f"cpu  {busy_ticks} 0 0 {idle_ticks} 0 0 0 0 0 0"]
    lines += [f"cpu{i} 0 0 0 0 0 0 0 0 0 0" for i in range(cpus)]
    path.write_text("\n".join(lines + ["intr 0", "ctxt 0"]) + "\n")


def test_other_load_counts_the_hosts_busy_cores_less_this_process() -> None:
    import os
    import tempfile
    import time

    cpus = len(os.sched_getaffinity(0))
    tick = 1.0 / os.sysconf("SC_CLK_TCK")
    with tempfile.TemporaryDirectory() as d:
        stat = Path(d) / "stat"
        _stat(stat, 1000, 5000, cpus)
        load = OtherLoad(stat=stat)
        assert load.usable and load.cores() is None  # one sample says nothing
        load.sample()
        t0, own0 = time.perf_counter(), time.process_time()
        end = t0 + 0.4
        while time.perf_counter() < end:  # this process keeps a core busy ...
            pass
        elapsed, own = time.perf_counter() - t0, time.process_time() - own0
        _stat(stat, 1000 + round((own + elapsed) / tick), 5000, cpus)  # ... and another one keeps one too
        load.sample()
        others = load.cores()
        assert others is not None and abs(others - 1.0) < 0.15
        _stat(stat, 1000, 5000, cpus + 1)  # more CPUs than this process may use: a host's, not ours
        assert not OtherLoad(stat=stat).usable and OtherLoad(stat=stat).cores() is None
        assert not OtherLoad(stat=Path(d) / "missing").usable

"""The decode steps' thread count: chosen by measuring, and never a cause of different tokens."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine.request import SamplingParams
from engine.thread_tuner import ThreadTuner
from tests.helpers import make_engine, run_to_completion


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def drive(tuner: ThreadTuner, step_s: dict[int, float], steps: int) -> list[int]:
    """Run `steps` decode steps whose time depends only on the thread count; the counts used, in order."""
    used = []
    for _ in range(steps):
        tuner.before()
        used.append(torch.get_num_threads())
        tuner.after(step_s[used[-1]])
    return used


def test_quiet_keeps_all_threads_after_trying_one() -> None:
    tuner = ThreadTuner(most=2, period=10, trial=2)
    used = drive(tuner, {2: 0.060, 1: 0.095}, steps=60)
    assert 1 in used and used.count(1) <= (60 // 10) * 2  # it tried one thread, only in trials
    assert tuner.current == 2 and tuner.switches == 0


def test_contention_moves_to_one_thread_and_back_when_it_ends() -> None:
    tuner = ThreadTuner(most=2, period=10, trial=2)
    drive(tuner, {2: 0.200, 1: 0.100}, steps=30)  # another process took a core: 2 threads collapse
    assert tuner.current == 1 and tuner.switches == 1
    used = drive(tuner, {2: 0.200, 1: 0.100}, steps=30)
    assert used.count(2) <= 3 * 2 and tuner.current == 1  # only trials run on 2 threads
    drive(tuner, {2: 0.060, 1: 0.095}, steps=30)  # the core is back
    assert tuner.current == 2 and tuner.switches == 2


def test_the_choice_never_leaks_outside_the_decode_step() -> None:
    """Prefills and any other engine in the process see the configured count, whatever the tuner chose."""
    tuner = ThreadTuner(most=2, period=4, trial=1, first=1)
    drive(tuner, {2: 0.200, 1: 0.100}, steps=12)
    assert tuner.current == 1 and torch.get_num_threads() == 2
    tuner.before()
    assert torch.get_num_threads() == 1


def test_one_slow_trial_step_decides_nothing() -> None:
    tuner = ThreadTuner(most=2, period=5, trial=3)
    times = iter([0.06] * 5 + [0.01, 0.2, 0.2] + [0.06] * 20)  # the trial's median is slow
    for _ in range(28):
        tuner.before()
        tuner.after(next(times))
    assert tuner.current == 2 and tuner.switches == 0


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
            engine.runner.tuner = ThreadTuner(most=2, period=2, trial=1, margin=1e9, first=2)  # always switches
        for rid, ids in prompts.items():
            engine.add_request(rid, prompt_token_ids=ids, sampling_params=params)
        outs = run_to_completion(engine)
        switches = engine.runner.tuner.switches if engine.runner.tuner else 0
        return {rid: [t for o in outs[rid] for t in o.new_token_ids] for rid in prompts}, switches

    fixed, _ = generate(adaptive=False)
    switched, switches = generate(adaptive=True)
    assert switches >= 4
    assert switched == fixed

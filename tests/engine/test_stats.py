"""Engine statistics: idle computation per policy (docs/architecture.md, "Policies"), slot accounting, timings, history."""

from __future__ import annotations

import pytest

from engine.request import SamplingParams
from tests.helpers import make_engine, run_to_completion

# Different prompt lengths and output lengths, so padding and early finishers exist.
WORKLOAD = [
    ("a", [5, 6, 7, 8, 9, 10, 11], 3),
    ("b", [100, 200], 9),
    ("c", [3000, 4000, 5000, 6000], 6),
    ("d", [42], 1),
]


def run(tiny_model, policy: str, workload=WORKLOAD, late: bool = False):
    engine = make_engine(tiny_model, policy=policy, max_batch_size=8)
    outs: dict[str, list] = {}
    for i, (rid, ids, n) in enumerate(workload):
        engine.add_request(rid, prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=n, ignore_eos=True))
        if late and i < len(workload) - 1:  # the rest join a running batch
            for o in engine.step():
                outs.setdefault(o.request_id, []).append(o)
    for rid, o in run_to_completion(engine).items():
        outs.setdefault(rid, []).extend(o)
    return engine, outs


def expected_useful(workload) -> int:
    """Every prompt token once, then one decode slot per output token after the first."""
    return sum(len(ids) + n - 1 for _, ids, n in workload)


@pytest.mark.parametrize("policy", ["baton-pd", "baton"])
@pytest.mark.parametrize("late", [False, True])
def test_baton_computes_nothing_idle(tiny_model, policy: str, late: bool) -> None:
    engine, outs = run(tiny_model, policy, late=late)
    s = engine.stats
    assert s.idle_slots == 0 and s.idle_fraction == 0.0
    assert s.useful_slots == expected_useful(WORKLOAD)
    assert s.prefill_tokens == sum(len(ids) for _, ids, _ in WORKLOAD)
    assert s.decode_tokens == sum(n - 1 for _, _, n in WORKLOAD)
    assert s.generated_tokens == sum(n for _, _, n in WORKLOAD)
    assert s.finished_requests == len(WORKLOAD) and s.aborted_requests == 0
    assert all(outs[rid][-1].usage.completion_tokens == n for rid, _, n in WORKLOAD)
    assert 0 < s.padded_columns < s.attended_columns  # left padding is real, but reported separately
    assert 0.0 < s.attention_padding_fraction < 1.0


def test_static_idles_finished_rows_and_padded_prompts(tiny_model) -> None:
    engine, _ = run(tiny_model, "static")
    s = engine.stats
    assert s.useful_slots == expected_useful(WORKLOAD)
    # One wide forward: 4 rows x 7 columns, of which 14 are prompt tokens.
    pad = 4 * 7 - sum(len(ids) for _, ids, _ in WORKLOAD)
    # Then "b" (9 tokens) holds the batch: every other row idles until it is done.
    finished_rows = sum(9 - n for _, _, n in WORKLOAD)
    assert s.idle_slots == pad + finished_rows
    assert s.idle_fraction == pytest.approx(s.idle_slots / (s.idle_slots + s.useful_slots))
    assert max(it.rows for it in s.history) == 4
    assert all(it.rows in (0, 4) for it in s.history)  # run to completion: no row leaves early


def test_orca_idles_running_rows_while_prompts_join(tiny_model) -> None:
    engine, _ = run(tiny_model, "orca", late=True)
    s = engine.stats
    assert s.useful_slots == expected_useful(WORKLOAD)
    assert s.idle_slots > 0
    engine_pd, _ = run(tiny_model, "baton-pd", late=True)
    assert engine_pd.stats.idle_fraction < s.idle_fraction


def test_uniform_workload_has_no_idle_slots_even_for_static(tiny_model) -> None:
    same = [(f"r{i}", [10 + i, 20 + i, 30 + i], 4) for i in range(3)]
    engine, _ = run(tiny_model, "static", workload=same)
    assert engine.stats.idle_slots == 0
    assert engine.stats.useful_slots == expected_useful(same)


@pytest.mark.parametrize("policy", ["static", "orca", "baton", "baton-pd"])
def test_timings_and_history(tiny_model, policy: str) -> None:
    engine, _ = run(tiny_model, policy, late=True)
    s = engine.stats
    assert s.iterations == engine.iteration == len(s.history) > 0
    assert [it.iteration for it in s.history] == list(range(s.iterations))
    for it in s.history:
        assert 0.0 <= it.forward_s <= it.total_s
        assert 0.0 <= it.controller_s <= it.total_s
        assert it.padded_columns <= it.attended_columns
    assert 0.0 < s.forward_s <= s.total_s
    assert s.forward_s == pytest.approx(sum(it.forward_s for it in s.history))
    assert s.total_s == pytest.approx(sum(it.total_s for it in s.history))
    assert s.useful_slots == sum(it.useful_slots for it in s.history)
    assert s.idle_slots == sum(it.idle_slots for it in s.history)
    assert 0.0 <= s.outside_forward_fraction < 1.0
    summary = s.summary()
    assert summary["iterations"] == s.iterations and summary["idle_fraction"] == s.idle_fraction


def test_single_request_has_no_padding(tiny_model) -> None:
    engine, _ = run(tiny_model, "baton-pd", workload=[("solo", [5, 6, 7], 5)])
    s = engine.stats
    assert s.padded_columns == 0 and s.attended_columns > 0 and s.idle_slots == 0
    assert s.rows_computed == 4  # 1 token from the prefill, then 4 decode steps of one row

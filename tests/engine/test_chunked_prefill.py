"""Chunked prefill across iterations (baton-pd): a long prompt is computed a few whole chunks per iteration,
within the prefill token budget, while the batch keeps decoding; its tokens are exactly its solo run's.

The tiny model with 32-token chunks and a 64-token budget: a 300-token prompt takes several iterations, two
chunks each. Its solo run (an empty engine) prefills it at once, through the same chunk boundaries.
"""

from __future__ import annotations

import random

import pytest

from engine import SamplingParams
from tests.helpers import make_engine, run_alone, tokens_of

CFG = {"policy": "baton-pd", "max_batch_size": 4, "prefill_chunk_tokens": 32, "prefill_token_budget": 64}


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40_000) for _ in range(n)]


def _long_beside_a_decoding_row(loaded, long_params: SamplingParams, **cfg):
    """A short request decoding; a 300-token prompt arrives at iteration 3. Returns the engine, the outputs
    and, per iteration after the arrival, (tokens the short request got, the plan's prefills)."""
    engine = make_engine(loaded, **{**CFG, **cfg})
    engine.add_request("short", prompt_token_ids=_ids(10, 1),
                       sampling_params=SamplingParams(max_tokens=40, ignore_eos=True))
    outs: dict[str, list] = {}
    trace = []
    for it in range(200):
        if it == 3:
            engine.add_request("long", prompt_token_ids=_ids(300, 2), sampling_params=long_params)
        plan_prefills: list = []
        original = engine.scheduler.schedule

        def spy(original=original, plan_prefills=plan_prefills):
            plan = original()
            plan_prefills.extend(plan.prefill)
            return plan

        engine.scheduler.schedule = spy
        got = engine.step()
        engine.scheduler.schedule = original
        for o in got:
            outs.setdefault(o.request_id, []).append(o)
        if it >= 3:
            short = sum(len(o.new_token_ids) for o in got if o.request_id == "short")
            trace.append((short, plan_prefills))
        if not engine.has_unfinished_requests():
            break
    return engine, outs, trace


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=8, ignore_eos=True),
                                    SamplingParams(max_tokens=8, ignore_eos=True, temperature=1.0, seed=5)],
                         ids=["greedy", "seeded"])
def test_a_long_prompt_is_prefilled_over_iterations_without_stalling_the_batch(tiny_model, params, prefix_caching):
    engine, outs, trace = _long_beside_a_decoding_row(tiny_model, params, prefix_caching=prefix_caching)
    partial = [p for _, prefills in trace for p in prefills if p.request_id == "long" and p.until is not None]
    # 300 tokens, 64 per iteration: chunks ending at 64, 128, 192, 256, then the rest (44) with its draw.
    assert [p.until for p in partial] == [64, 128, 192, 256]
    assert all(p.computed_tokens <= CFG["prefill_token_budget"] for p in partial)
    assert [p.cached_tokens for p in partial] == [0, 64, 128, 192]
    # The short request decoded a token in every one of those iterations: no stall.
    stalled = [i for i, (short, prefills) in enumerate(trace)
               if any(p.request_id == "long" for p in prefills) and short != 1]
    assert stalled == []
    # Exactly what the long prompt gets alone (an empty engine prefills it at once).
    alone = run_alone(tiny_model, _ids(300, 2), params, **CFG, prefix_caching=prefix_caching)
    assert tokens_of(outs["long"]) == tokens_of(alone) and len(tokens_of(alone)) == 8
    assert engine.scheduler.queues.partial == {}


def test_without_chunking_the_long_prompt_is_one_prefill(tiny_model) -> None:
    """The comparison above has teeth: with chunks as large as the prompt, the prefill goes at once."""
    _, _, trace = _long_beside_a_decoding_row(tiny_model, SamplingParams(max_tokens=8, ignore_eos=True),
                                              prefill_chunk_tokens=512)
    longs = [p for _, prefills in trace for p in prefills if p.request_id == "long"]
    assert [(p.until, p.computed_tokens) for p in longs] == [(None, 300)]


def test_aborting_a_partly_prefilled_request_frees_its_chunks(tiny_model) -> None:
    engine = make_engine(tiny_model, **CFG)
    engine.add_request("short", prompt_token_ids=_ids(10, 1),
                       sampling_params=SamplingParams(max_tokens=40, ignore_eos=True))
    engine.step()
    engine.add_request("long", prompt_token_ids=_ids(300, 2), sampling_params=SamplingParams(max_tokens=4))
    engine.step()
    engine.step()
    partial = engine.scheduler.queues.partial
    assert set(partial) == {"long"} and partial["long"].length == 128
    held, _ = engine.scheduler.queues.held_bytes()
    assert held >= partial["long"].nbytes() > 0  # counted as the engine's memory
    engine.abort_request("long")
    assert engine.scheduler.queues.partial == {}

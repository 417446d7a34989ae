"""Greedy output of the re-batching engine equals solo `generate`, token for token (docs/architecture.md, "Exactness").

Requests arrive at random iterations with random prompt and output lengths, so rows join, leave, get
left-padded and trimmed all through the run. The last tests break the padding mask or the position ids on
purpose and check that this comparison notices: the exactness check has teeth.
"""

from __future__ import annotations

import pytest
import torch

from engine import model_runner
from engine.engine import BatonEngine
from engine.kv_cache import BatchKVCache
from tests.helpers import make_engine, mismatches, random_workload, run_workload, solo_greedy

POLICIES = ["static", "orca", "baton", "baton-pd"]


def _check_cache(engine: BatonEngine) -> None:
    engine.cache.check_invariants()


@pytest.fixture(scope="module")
def default_workload(default_model):
    """12 requests: prompts 1-300 tokens, 1-64 new tokens (skewed short, as real outputs are: the solo
    reference costs one forward per token), arrivals over 20 iterations; and their solo outputs. Rows still
    join, leave, pad and trim all through the run (the float64 test below runs 100 requests per policy)."""
    work = random_workload(seed=7, n=12, vocab=default_model.model.config.vocab_size,
                           prompt_len=(1, 300), max_tokens=(1, 64), arrival_span=20, skew_outputs=True)
    assert max(len(w["prompt"]) for w in work) >= 250 and max(w["max_tokens"] for w in work) == 64
    ref = {w["id"]: solo_greedy(default_model.model, w["prompt"], w["max_tokens"]) for w in work}
    return work, ref


@pytest.mark.parametrize(
    ("policy", "rows"),
    [("static", 6), ("orca", 2), ("baton", 5), ("baton-pd", 16)],
)
def test_default_model_matches_solo_generate(default_model, default_workload, policy, rows):
    work, ref = default_workload
    engine = make_engine(default_model, policy=policy, max_batch_size=rows, prefill_token_budget=256)
    got = run_workload(engine, work, check=_check_cache)
    assert mismatches(got, ref) == []
    assert engine.cache.rows == 0 or all(engine.scheduler.running[r].finished for r in engine.cache.ids)


@pytest.mark.parametrize("policy", POLICIES)
def test_float64_many_requests_match_solo_generate(tiny_small_vocab_model, policy):
    tiny_model = tiny_small_vocab_model
    work = random_workload(seed=11, n=100, vocab=tiny_model.model.config.vocab_size,
                           prompt_len=(1, 80), max_tokens=(1, 40), arrival_span=100)
    ref = {w["id"]: solo_greedy(tiny_model.model, w["prompt"], w["max_tokens"]) for w in work}
    for rows in (2, 24):
        engine = make_engine(tiny_model, policy=policy, max_batch_size=rows, prefill_token_budget=64)
        got = run_workload(engine, work, check=_check_cache)
        assert mismatches(got, ref) == [], f"{policy} rows={rows}"


# ---- teeth: the same comparison must fail when vector shaping is broken ------------------------------------
@pytest.fixture(scope="module")
def small_workload(default_model):
    work = random_workload(seed=3, n=8, vocab=default_model.model.config.vocab_size,
                           prompt_len=(2, 60), max_tokens=(8, 24), arrival_span=6)
    ref = {w["id"]: solo_greedy(default_model.model, w["prompt"], w["max_tokens"]) for w in work}
    return work, ref


def test_small_workload_is_exact_when_nothing_is_broken(default_model, small_workload):
    work, ref = small_workload
    got = run_workload(make_engine(default_model, policy="baton-pd", max_batch_size=8), work)
    assert mismatches(got, ref) == []


@pytest.mark.parametrize("captured", [True, False], ids=["captured", "eager"])
def test_broken_padding_mask_is_caught(default_model, small_workload, monkeypatch, captured):
    """In the captured decode step (engine/captured.py) and in the eager forward alike."""
    real_view = BatchKVCache.mask_view

    def attend_everything(self, extra=0, aligned=False):  # padding columns no longer masked
        return real_view(self, extra, aligned) | True

    monkeypatch.setattr(BatchKVCache, "mask_view", attend_everything)
    work, ref = small_workload
    got = run_workload(make_engine(default_model, policy="baton-pd", max_batch_size=8, captured_forward=captured), work)
    assert len(mismatches(got, ref)) >= len(ref) // 2


def test_broken_position_ids_are_caught(default_model, small_workload, monkeypatch):
    real_forward = model_runner.ModelRunner.batch_forward

    def column_positions(self, cache, input_ids, positions, real):  # position = cache length: padding counted
        return real_forward(self, cache, input_ids, torch.full_like(positions, cache.length), real)

    monkeypatch.setattr(model_runner.ModelRunner, "batch_forward", column_positions)
    work, ref = small_workload
    got = run_workload(make_engine(default_model, policy="baton-pd", max_batch_size=8), work)
    assert len(mismatches(got, ref)) >= len(ref) // 2

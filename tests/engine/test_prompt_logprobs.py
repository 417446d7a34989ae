"""Prompt logprobs (`SamplingParams.prompt_logprobs`, what completions' echo with logprobs returns): computed
by the request's first prefill (or, under static/orca, a forward of its prompt alone), equal to a full forward
of the prompt, returned once with the first output, never again after a recompute preemption or a failover
continuation; other requests and the request's own tokens are unchanged."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.plan import Prefill
from engine.prompt_logprobs import prompt_logprobs
from engine.request import SamplingParams, TokenLogprobs
from tests.conftest import _tiny_llama
from tests.engine.test_controller_integration import PLENTY, controlled
from tests.helpers import make_engine, run_alone, run_beside, run_schedule, run_to_completion, tokens_of

PROMPT = [17, 424, 911, 300, 5, 77, 123, 8, 640]
ASK = SamplingParams(max_tokens=6, temperature=0.8, seed=11, ignore_eos=True, logprobs=2, prompt_logprobs=4)
POLICIES = ["baton-pd", "baton", "orca", "static"]


@pytest.fixture(scope="module")
def tiny32(tiny_small_vocab_model):
    """The tiny small-vocabulary Llama in float32 (a fresh copy: the session's fixture stays float64)."""
    loaded = _tiny_llama(tiny_small_vocab_model.tokenizer, 1024)
    loaded.model.to(torch.float32)
    return type(loaded)(model=loaded.model, tokenizer=loaded.tokenizer, dtype=torch.float32,
                        device=loaded.device, name="tiny32")


def reference(loaded, ids: list[int], top: int) -> tuple[torch.Tensor, list[list[int]]]:
    """log_softmax of one full forward over `ids` (float64 over the model's logits): [P-1] the logprob of each
    token after the first, and each position's top `top` ids."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    return logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], torch.topk(logp, top).indices.tolist()


def the_prompt_logprobs(outs: list) -> list[TokenLogprobs | None]:
    """The one output carrying prompt logprobs is the first; no other carries any."""
    assert outs[0].prompt_logprobs is not None and outs[0].new_token_ids, "with the first token"
    assert all(o.prompt_logprobs is None for o in outs[1:]), "delivered once"
    return outs[0].prompt_logprobs


def assert_reference(loaded, ids: list[int], got: list[TokenLogprobs | None], top: int, tol: float) -> None:
    ref, ref_top = reference(loaded, ids, top)
    assert len(got) == len(ids) and got[0] is None
    for i, lp in enumerate(got[1:]):
        assert lp is not None and lp.token_id == ids[i + 1]
        assert lp.logprob == pytest.approx(float(ref[i]), abs=tol)
        assert [t for t, _ in lp.top] == ref_top[i]


@pytest.mark.parametrize("policy", POLICIES)
def test_prompt_logprobs_equal_a_full_forward_float32(tiny32, policy: str) -> None:
    outs = run_alone(tiny32, PROMPT, ASK, policy=policy)
    assert_reference(tiny32, PROMPT, the_prompt_logprobs(outs), top=4, tol=1e-6)
    plain = run_alone(tiny32, PROMPT, SamplingParams(**{**ASK.__dict__, "prompt_logprobs": None}), policy=policy)
    assert tokens_of(outs) == tokens_of(plain), "asking for prompt logprobs does not change the tokens"
    assert all(o.prompt_logprobs is None for o in plain)
    assert [lp.logprob for o in outs for lp in o.logprobs] == [lp.logprob for o in plain for lp in o.logprobs]


@pytest.mark.parametrize("policy", POLICIES)
def test_prompt_logprobs_beside_other_requests(tiny_small_vocab_model, policy: str) -> None:
    """Float64: the same values in a batch of others (some asking too), whose own tokens are unchanged."""
    loaded = tiny_small_vocab_model
    other = ([3, 9, 27, 81], SamplingParams(max_tokens=8, ignore_eos=True, prompt_logprobs=0))
    plain = ([5, 6, 7], SamplingParams(max_tokens=9, ignore_eos=True))
    if policy == "static":  # run to completion: a batch forms once, so everyone arrives together
        outs = run_schedule(make_engine(loaded, max_batch_size=8, policy=policy),
                            {0: [("plain", *plain), ("other", *other), ("target", PROMPT, ASK)]})
    else:
        outs = run_beside(loaded, PROMPT, ASK, {0: [("plain", *plain)], 1: [("other", *other)]}, policy=policy)
    assert_reference(loaded, PROMPT, the_prompt_logprobs(outs["target"]), top=4, tol=1e-9)
    got = the_prompt_logprobs(outs["other"])
    assert_reference(loaded, other[0], got, top=0, tol=1e-9)
    assert all(lp is None or lp.top == () for lp in got)
    assert all(o.prompt_logprobs is None for o in outs["plain"])
    assert tokens_of(outs["plain"]) == tokens_of(run_alone(loaded, *plain, policy=policy))


def test_only_the_first_prefill_asks_for_every_position(tiny_small_vocab_model) -> None:
    """The plan's flag (`Prefill.prompt_logprobs`, which a prefix cache must respect) is on for the request's
    first prefill only; one prompt token: a single None."""
    engine = make_engine(tiny_small_vocab_model)
    engine.add_request("a", prompt_token_ids=PROMPT, sampling_params=ASK)
    engine.add_request("b", prompt_token_ids=[42], sampling_params=SamplingParams(max_tokens=2, prompt_logprobs=3))
    engine.add_request("c", prompt_token_ids=PROMPT, sampling_params=SamplingParams(max_tokens=2))
    plan = engine.scheduler.schedule()
    flags = {p.request_id: p.prompt_logprobs for p in plan.prefill}
    assert flags == {"a": 4, "b": 3, "c": None}
    result = engine.runner.execute(plan, engine.cache)
    assert set(result.prompt_logprobs) == {"a", "b"} and result.prompt_logprobs["b"] == [None]
    recomputed = Prefill("a", (*PROMPT, 5), engine.scheduler._spec(engine.scheduler.requests["a"], ahead=1), False)
    assert recomputed.prompt_logprobs is None


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_prompt_logprobs_are_delivered_once_through_preemption(tiny_small_vocab_model, mode: str) -> None:
    """An urgent arrival displaces the younger of two rows, which is then re-prefilled (recompute) or swapped
    back: its prompt logprobs came with its first token and never come again; its tokens are its solo run's."""
    loaded = tiny_small_vocab_model
    engine = controlled(loaded, PLENTY, rows=2, min_priority_gap=5, preemption_mode=mode)
    arrivals = {0: [("a", ASK, 5)], 1: [("b", ASK, 5)], 3: [("c", SamplingParams(max_tokens=4), 0)]}
    outs: dict[str, list] = {}
    while engine.has_unfinished_requests() or engine.iteration <= max(arrivals):
        for rid, params, priority in arrivals.get(engine.iteration, []):
            engine.add_request(rid, prompt_token_ids=PROMPT, sampling_params=params, priority=priority)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        assert engine.iteration < 200
    assert engine.stats.preemptions_by_mode[mode] == 1, engine.stats.preemptions_by_mode
    alone = run_alone(loaded, PROMPT, ASK)
    for rid in ("a", "b"):
        assert the_prompt_logprobs(outs[rid]) == the_prompt_logprobs(alone), rid
        assert tokens_of(outs[rid]) == tokens_of(alone), rid
    assert all(o.prompt_logprobs is None for o in outs["c"])


def test_a_continuation_does_not_compute_them_again(tiny_small_vocab_model) -> None:
    """Failover: resumed after k tokens, the request's prefill keeps only the last position."""
    loaded = tiny_small_vocab_model
    tokens = tokens_of(run_alone(loaded, PROMPT, ASK))
    engine = make_engine(loaded)
    engine.enqueue(engine.make_request("r", prompt_token_ids=PROMPT, sampling_params=ASK, resume_token_ids=tokens[:2]))
    assert [p.prompt_logprobs for p in engine.scheduler.schedule().prefill] == [None]
    engine = make_engine(loaded)
    engine.enqueue(engine.make_request("r", prompt_token_ids=PROMPT, sampling_params=ASK, resume_token_ids=tokens[:2]))
    rest = run_to_completion(engine)["r"]
    assert tokens_of(rest) == tokens[2:] and all(o.prompt_logprobs is None for o in rest)


def test_a_long_prompt_is_scored_in_chunks(tiny_small_vocab_model, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import prompt_logprobs as module

    monkeypatch.setattr(module, "CHUNK", 3)
    ids = [(7 * i + 3) % 1000 + 3 for i in range(11)]
    got = the_prompt_logprobs(run_alone(tiny_small_vocab_model, ids, SamplingParams(max_tokens=1, prompt_logprobs=2)))
    assert_reference(tiny_small_vocab_model, ids, got, top=2, tol=1e-9)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(1, 6), vocab=st.integers(2, 50), top=st.integers(0, 20), seed=st.integers(0, 2**31),
       scale=st.sampled_from([0.1, 1.0, 30.0]))
def test_top_logprobs_are_sorted_and_sum_to_at_most_one(rows: int, vocab: int, top: int, seed: int,
                                                        scale: float) -> None:
    """For prompt and generated tokens alike (one function computes both): the alternatives are the most
    likely first, their probabilities sum to at most 1, and the chosen token's logprob is that of its id."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    ids = torch.randint(0, vocab, (rows,), generator=g).tolist()
    got = prompt_logprobs(logits, ids, top)
    assert got[0] is None and len(got) == rows
    logp = torch.log_softmax(logits.double(), dim=-1)
    for i, lp in enumerate(got[1:]):
        assert lp is not None and len(lp.top) == min(top, vocab)
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-9
        assert lp.logprob == pytest.approx(float(logp[i, ids[i + 1]]), abs=1e-12)

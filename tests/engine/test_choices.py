"""A request's n choices (engine/choices.py): the prompt is prefilled once and its KV copied into each choice;
every choice is token-identical to a solo run of the prompt with that choice's seed (s + i for an explicit
seed s, else the seed derived from the choice's own id), under every policy, beside other requests, and
under swap and recompute preemption."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from configs.controller import ControllerConfig
from configs.errors import FieldError
from engine import model_runner
from engine.choices import choice_id, choice_params, choices_to_run
from engine.request import SamplingParams
from tests.helpers import make_engine

PLENTY = 1 << 40  # a memory budget nothing here comes near: only priorities preempt


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/engine/conftest.py


def run_choices(engine, rid, prompt, params, n, resume=(), beside=(), priority=0):
    """Submit `rid` with n choices (and `beside`: (id, prompt, params) requests) and step to the end.
    Returns {(request id, choice index): outputs} and the iteration stats."""
    for other, ids, p in beside:
        engine.add_request(other, prompt_token_ids=ids, sampling_params=p)
    engine.enqueue_all(engine.make_choices(rid, prompt_token_ids=prompt, sampling_params=params, n=n,
                                           resume_token_ids=resume, priority=priority))
    outs: dict[tuple[str, int], list] = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            return outs
        for o in engine.step():
            outs.setdefault((o.request_id, o.index), []).append(o)
        engine.cache.check_invariants()
    raise AssertionError("engine did not finish")


def solo(loaded, rid, prompt, params, **cfg):
    engine = make_engine(loaded, **cfg)
    engine.add_request(rid, prompt_token_ids=prompt, sampling_params=params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def tokens(outs) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def logprobs(outs) -> list:
    return [lp for o in outs for lp in (o.logprobs or ())]


PARAMS = st.sampled_from([
    dict(temperature=0.9, top_p=0.95),
    dict(temperature=1.3, top_k=20, logprobs=2),
    dict(temperature=0.8, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.2),
    dict(temperature=1.0, min_tokens=1, logit_bias={7: 5.0}),
])


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.sampled_from(["baton-pd", "baton", "orca", "static"]), n=st.integers(2, 4),
       seed=st.one_of(st.none(), st.integers(0, 2**40)), fields=PARAMS, max_tokens=st.integers(1, 9),
       prompt_seed=st.integers(0, 10**6), beside=st.booleans())
def test_each_choice_is_a_solo_run_with_its_seed(tiny_small_vocab_model, policy, n, seed, fields, max_tokens,
                                                 prompt_seed, beside):
    rng = random.Random(prompt_seed)
    prompt = [rng.randrange(100, 1024) for _ in range(rng.randint(1, 12))]
    params = SamplingParams(max_tokens=max_tokens, seed=seed, **fields)
    other = [("other", [rng.randrange(100, 1024) for _ in range(5)], SamplingParams(max_tokens=6))] if beside else []
    cfg = dict(policy=policy, max_batch_size=8)
    got = run_choices(make_engine(tiny_small_vocab_model, **cfg), "r", prompt, params, n, beside=other)
    assert {k for k in got if k[0] == "r"} == {("r", i) for i in range(n)}
    for i in range(n):
        # Choice i is the solo request with choice i's id and parameters (seed s + i; or derived from the id).
        alone = solo(tiny_small_vocab_model, choice_id("r", i), prompt, choice_params(params, i), **cfg)
        mine = got[("r", i)]
        assert tokens(mine) == tokens(alone), (i, policy)
        assert "".join(o.text for o in mine) == "".join(o.text for o in alone)
        assert logprobs(mine) == logprobs(alone)
        assert mine[-1].finished and (mine[-1].finish_reason, mine[-1].usage) == (alone[-1].finish_reason,
                                                                                    alone[-1].usage)
        assert all(not o.finished for o in mine[:-1])


def test_seeded_choices_differ_and_choice_zero_is_the_plain_request(tiny_small_vocab_model):
    """The choices are really different draws (s, s + 1, ...), and choice 0 is what n = 1 gives."""
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=11, ignore_eos=True)
    prompt = [200, 300, 400, 500]
    got = run_choices(make_engine(tiny_small_vocab_model), "r", prompt, params, 4)
    drawn = [tokens(got[("r", i)]) for i in range(4)]
    assert len({tuple(t) for t in drawn}) == 4
    assert drawn[0] == tokens(solo(tiny_small_vocab_model, "r", prompt, params))


@pytest.mark.parametrize("policy", ["baton-pd", "baton"])
def test_the_prompt_is_prefilled_once_and_each_copy_is_counted(tiny_small_vocab_model, policy):
    """n = 4 over an L-token prompt: L prefill tokens computed, not 4L; the pool (baton-pd) or the batch
    (baton) holds 4 copies of its KV, and the engine's accounting counts all 4."""
    prompt = list(range(300, 317))
    engine = make_engine(tiny_small_vocab_model, policy=policy, max_batch_size=8)
    params = SamplingParams(max_tokens=5, temperature=0.7, seed=3, ignore_eos=True)
    engine.enqueue_all(engine.make_choices("r", prompt_token_ids=prompt, sampling_params=params, n=4))
    engine.step()
    first = engine.stats.history[-1]
    assert first.prefill_tokens == len(prompt)
    per_copy = len(prompt) * engine.cache.bytes_per_token
    if policy == "baton-pd":
        assert len(engine.scheduler.queues.pool) == 4 and engine.cache.rows == 0
        assert engine.scheduler.queues.held_bytes()[0] == 4 * per_copy
    else:
        assert engine.cache.rows == 4 and sorted(engine.cache.real) == [len(prompt) + 1] * 4
    while engine.has_unfinished_requests():
        engine.step()
    assert sum(h.prefill_tokens for h in engine.stats.history) == len(prompt)


def test_siblings_that_do_not_fit_the_pool_are_prefilled_later_and_stay_exact(tiny_small_vocab_model):
    """A pool of 2 entries: n = 3 splits into a prefill of two and one of one; still each its solo run."""
    prompt = list(range(400, 410))
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=5, ignore_eos=True)
    engine = make_engine(tiny_small_vocab_model, prefill_pool_size=2, max_batch_size=1)
    got = run_choices(engine, "r", prompt, params, 3)
    assert sum(h.prefill_tokens for h in engine.stats.history) == 2 * len(prompt)
    for i in range(3):
        assert tokens(got[("r", i)]) == tokens(solo(tiny_small_vocab_model, "x", prompt, choice_params(params, i)))


@pytest.mark.parametrize("cfg", [dict(policy="baton-pd", max_batch_size=8), dict(policy="baton", max_batch_size=8),
                                 dict(policy="orca", max_batch_size=8), dict(policy="static", max_batch_size=8),
                                 dict(policy="baton-pd", prefill_pool_size=2, max_batch_size=1)])
def test_prompt_logprobs_are_computed_once_and_go_to_every_choice(tiny_small_vocab_model, cfg, monkeypatch):
    """echo with n: the prompt logprobs are computed once (choice 0's first forward of the prompt; a pool of
    2 prefills the third choice later) and each choice's stream carries them once, no later than its first
    token, equal to n = 1's; each choice's tokens are still its solo run's."""
    scored = []
    real = model_runner.prompt_logprobs
    monkeypatch.setattr(model_runner, "prompt_logprobs", lambda *a: scored.append(a[1]) or real(*a))
    prompt = list(range(500, 511))
    params = SamplingParams(max_tokens=4, temperature=0.9, seed=7, ignore_eos=True, logprobs=1, prompt_logprobs=2)
    got = run_choices(make_engine(tiny_small_vocab_model, **cfg), "r", prompt, params, 3)
    assert [list(ids) for ids in scored] == [prompt], "computed once"
    scored.clear()
    expected = solo(tiny_small_vocab_model, "r", prompt, params, **cfg)[0].prompt_logprobs
    assert expected is not None and len(expected) == len(prompt)
    for i in range(3):
        mine = got[("r", i)]
        carrying = [k for k, o in enumerate(mine) if o.prompt_logprobs is not None]
        assert len(carrying) == 1 and mine[carrying[0]].prompt_logprobs == expected, i
        assert carrying[0] <= next(k for k, o in enumerate(mine) if o.new_token_ids), "before or with the first token"
        alone = solo(tiny_small_vocab_model, choice_id("r", i), prompt, choice_params(params, i), **cfg)
        assert tokens(mine) == tokens(alone) and logprobs(mine) == logprobs(alone)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_choices_stay_exact_under_preemption(tiny_small_vocab_model, mode):
    """Three choices fill a 3-row batch; an urgent arrival displaces the youngest; every choice still gives
    its solo tokens, whether its KV went to host or was recomputed from its own tokens."""
    controller = ControllerConfig(probe="simulated", memory_budget_bytes=PLENTY, min_priority_gap=5,
                                  preemption_mode=mode)
    engine = make_engine(tiny_small_vocab_model, max_batch_size=3, controller=controller)
    params = SamplingParams(max_tokens=24, temperature=0.9, seed=21, ignore_eos=True, presence_penalty=0.5)
    prompt = list(range(500, 520))
    engine.enqueue_all(engine.make_choices("r", prompt_token_ids=prompt, sampling_params=params, n=3,
                                           priority=5))
    got: dict[tuple[str, int], list] = {}
    for it in range(1000):
        if it == 6:
            engine.add_request("urgent", prompt_token_ids=[600, 601, 602], priority=0,
                               sampling_params=SamplingParams(max_tokens=4))
        if it > 6 and not engine.has_unfinished_requests():
            break
        for o in engine.step():
            got.setdefault((o.request_id, o.index), []).append(o)
        engine.cache.check_invariants()
    assert engine.stats.preemptions_by_mode.get(mode, 0) >= 1
    for i in range(3):
        assert tokens(got[("r", i)]) == tokens(solo(tiny_small_vocab_model, "x", prompt, choice_params(params, i))), i


def test_a_continuation_runs_only_the_unfinished_choices_after_their_tokens(tiny_small_vocab_model):
    """After a failover the ingress resubmits only the unfinished choices, each after what it streamed:
    they continue exactly, and the finished ones are not run again."""
    prompt = list(range(700, 712))
    params = SamplingParams(max_tokens=10, temperature=1.1, seed=8, ignore_eos=True)
    full = run_choices(make_engine(tiny_small_vocab_model), "r", prompt, params, 3)
    whole = {i: tokens(full[("r", i)]) for i in range(3)}
    engine = make_engine(tiny_small_vocab_model)
    rest = run_choices(engine, "r", prompt, params, 3, resume={1: whole[1][:4], 2: whole[2][:7]})
    assert set(rest) == {("r", 1), ("r", 2)}
    assert tokens(rest[("r", 1)]) == whole[1][4:] and tokens(rest[("r", 2)]) == whole[2][7:]
    assert rest[("r", 2)][-1].usage == full[("r", 2)][-1].usage


def test_abort_ends_every_choice(tiny_small_vocab_model):
    engine = make_engine(tiny_small_vocab_model)
    engine.enqueue_all(engine.make_choices("r", prompt_token_ids=[300, 301], n=3,
                                           sampling_params=SamplingParams(max_tokens=50, ignore_eos=True)))
    engine.step()
    engine.step()
    engine.abort_request("r")
    assert not engine.has_unfinished_requests() and engine.cache.rows == 0
    assert {(o.index, o.finish_reason) for o in engine.outputs.drain()} == {(0, "abort"), (1, "abort"), (2, "abort")}


def test_bad_n_and_resume_are_field_errors(tiny_small_vocab_model):
    engine = make_engine(tiny_small_vocab_model)
    for n in (0, 17, True, 2.0):
        with pytest.raises(FieldError) as e:
            engine.make_choices("r", prompt_token_ids=[300], n=n)
        assert e.value.param == "n"
    for resume in ([5], {3: [5]}, {}):
        with pytest.raises(FieldError) as e:
            engine.make_choices("r", prompt_token_ids=[300], n=3, resume_token_ids=resume)
        assert e.value.param == "resume_token_ids"
    assert choices_to_run(2) == {0: [], 1: []} and choices_to_run(1, [4, 5]) == {0: [4, 5]}


@pytest.mark.parametrize("policy", ["baton-pd", "baton"])
def test_structured_output_choices_each_follow_their_own_grammar(tiny_model, policy):
    """Each choice has its own matcher, advanced by its own draws from the shared prefill's logits."""
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=2, regex=r"(yes|no|maybe)( [0-9]{1,3})?")
    prompt = tiny_model.tokenizer.encode("Answer:")
    got = run_choices(make_engine(tiny_model, policy=policy), "r", prompt, params, 4)
    texts = []
    for i in range(4):
        alone = solo(tiny_model, "x", prompt, choice_params(params, i), policy=policy)
        assert tokens(got[("r", i)]) == tokens(alone), i
        texts.append("".join(o.text for o in got[("r", i)]))
    assert len(set(texts)) > 1, texts


def test_a_stream_of_choices_ends_after_each_and_a_closing_front_fails_the_rest():
    """engine/streams.py: a finished choice does not end the stream; closing the front (its loop died) ends
    every unfinished choice with an error, so no consumer waits forever; on_close runs once."""
    import asyncio

    from engine.request import RequestOutput
    from engine.streams import OpenStreams

    async def run():
        streams, closed, aborted = OpenStreams(), [], []
        stream = streams.open("r", lambda *a: aborted.append(a), lambda: closed.append(1), choices=(0, 1, 2))
        streams.deliver([RequestOutput("r", [5], "a", index=0),
                         RequestOutput("r", [6], "b", True, "length", index=1)])
        streams.close("the engine loop died")
        outs = [o async for o in stream]
        return outs, closed, aborted

    outs, closed, aborted = asyncio.run(run())
    assert [(o.index, o.finished, o.finish_reason) for o in outs] == [
        (0, False, None), (1, True, "length"), (0, True, "error"), (2, True, "error")]
    assert closed == [1] and aborted == []

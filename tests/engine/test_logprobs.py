"""Logprobs: computed by the runner from the logits each token is drawn from (raw log_softmax), only for the
requests that ask, and the same for a request alone or in any batch (docs/architecture.md, "Exactness")."""

from __future__ import annotations

import math
import random

import pytest
import torch

from configs.errors import FieldError
from engine import model_runner
from engine.model_loader import LoadedModel
from engine.request import SamplingParams, TokenLogprobs
from tests.conftest import _tiny_llama
from tests.helpers import make_engine, run_schedule, run_to_completion

PROMPT = [17, 424, 911, 300, 5, 77, 123]
ASK = SamplingParams(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True, logprobs=5)


def logprobs_of(outs: list) -> list[TokenLogprobs]:
    assert all(o.logprobs is not None and len(o.logprobs) == len(o.new_token_ids) for o in outs)
    return [lp for o in outs for lp in o.logprobs]


def others(seed: int, vocab: int, n: int = 6) -> dict[int, list[tuple[str, list[int], SamplingParams]]]:
    """Requests arriving at random iterations, some asking for logprobs, some not."""
    rng = random.Random(seed)
    schedule: dict[int, list] = {}
    for i in range(n):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))]
        params = SamplingParams(max_tokens=rng.randint(3, 12), temperature=rng.choice([0.0, 0.7]),
                                seed=rng.randrange(1000), ignore_eos=True, logprobs=rng.choice([None, 0, 3, 20]))
        schedule.setdefault(rng.choice([0, 1, 2, 4, 6]), []).append((f"o{i}", ids, params))
    return schedule


def run(loaded, schedule: dict[int, list[tuple[str, list[int], SamplingParams]]], **cfg) -> dict[str, list]:
    return run_schedule(make_engine(loaded, **cfg), schedule)


def test_logprobs_equal_the_models_log_softmax(tiny_small_vocab_model) -> None:
    loaded = tiny_small_vocab_model
    outs = run(loaded, {0: [("r", PROMPT, ASK)]})["r"]
    tokens = [t for o in outs for t in o.new_token_ids]
    got = logprobs_of(outs)
    assert [lp.token_id for lp in got] == tokens and len(tokens) == ASK.max_tokens
    with torch.no_grad():  # one direct forward over prompt + output: position i predicts output token i
        logits = loaded.model(torch.tensor([PROMPT + tokens[:-1]])).logits[0, len(PROMPT) - 1:]
    ref = torch.log_softmax(logits.to(torch.float64), dim=-1)  # [tokens, V]
    for i, lp in enumerate(got):
        assert lp.logprob == pytest.approx(float(ref[i, tokens[i]]), abs=1e-6)
        values, ids = torch.topk(ref[i], 5)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert sum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-9
        assert lp.logprob <= lp.top[0][1]
    assert any(lp.token_id != lp.top[0][0] for lp in got), "sampled at T=0.9: some token is not the argmax"


@pytest.mark.parametrize("policy", ["baton-pd", "baton", "orca", "static"])
def test_logprobs_are_the_same_alone_and_in_a_batch_float64(tiny_small_vocab_model, policy: str) -> None:
    vocab = tiny_small_vocab_model.model.config.vocab_size
    alone = run(tiny_small_vocab_model, {0: [("r", PROMPT, ASK)]}, policy=policy)["r"]
    schedule = others(3, vocab)
    schedule.setdefault(2, []).append(("r", PROMPT, ASK))
    batched = run(tiny_small_vocab_model, schedule, policy=policy, max_batch_size=4)
    assert_same(logprobs_of(alone), logprobs_of(batched["r"]), tol=1e-9)
    for rid, _ids, params in (x for xs in schedule.values() for x in xs):
        if params.logprobs is None:
            assert all(o.logprobs is None for o in batched[rid])
        else:
            assert all(len(lp.top) == params.logprobs for lp in logprobs_of(batched[rid]))


def test_logprobs_are_the_same_alone_and_in_a_batch_float32(tiny_small_vocab_model) -> None:
    model = _tiny_llama(tiny_small_vocab_model.tokenizer, 1024).model.to(torch.float32)  # a fresh copy
    loaded = LoadedModel(model=model, tokenizer=tiny_small_vocab_model.tokenizer, dtype=torch.float32,
                         device=torch.device("cpu"), name="tiny32")
    alone = run(loaded, {0: [("r", PROMPT, ASK)]})["r"]
    schedule = others(4, model.config.vocab_size)
    schedule.setdefault(1, []).append(("r", PROMPT, ASK))
    batched = run(loaded, schedule, max_batch_size=4)["r"]
    assert_same(logprobs_of(alone), logprobs_of(batched), tol=1e-4)


def assert_same(a: list[TokenLogprobs], b: list[TokenLogprobs], tol: float) -> None:
    assert [x.token_id for x in a] == [y.token_id for y in b]
    for x, y in zip(a, b, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=tol)
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
        assert [v for _, v in x.top] == pytest.approx([v for _, v in y.top], abs=tol)


def test_no_logprobs_cost_nothing_and_zero_gives_the_token_alone(tiny_small_vocab_model, monkeypatch) -> None:
    def never(*args: object) -> None:
        raise AssertionError("logprobs computed for a batch where no request asked")

    real = model_runner.token_logprobs
    monkeypatch.setattr(model_runner, "token_logprobs", never)
    plain = SamplingParams(max_tokens=4, ignore_eos=True)
    outs = run_to_completion_of(tiny_small_vocab_model, plain)
    assert all(o.logprobs is None for o in outs)
    monkeypatch.setattr(model_runner, "token_logprobs", real)
    zero = logprobs_of(run_to_completion_of(tiny_small_vocab_model, SamplingParams(max_tokens=4, logprobs=0,
                                                                                   ignore_eos=True)))
    assert len(zero) == 4 and all(lp.top == () and lp.logprob <= 0 for lp in zero)


def run_to_completion_of(loaded, params: SamplingParams) -> list:
    engine = make_engine(loaded)
    engine.add_request("r", prompt_token_ids=PROMPT, sampling_params=params)
    return run_to_completion(engine)["r"]


@pytest.mark.parametrize("bad", [-1, 21, True, 2.0])
def test_a_bad_logprobs_count_names_the_field(bad: object) -> None:
    with pytest.raises(FieldError) as e:
        SamplingParams(logprobs=bad)  # type: ignore[arg-type]
    assert e.value.param == "logprobs"

"""Logit adjustments (presence, frequency and repetition penalties, logit_bias, min_tokens): the batched maths
equals a plain per-row implementation; each is per request and batch-invariant, composes with the others,
with seeds and with stops; logprobs stay the raw model's (docs/architecture.md, "Exactness")."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from engine.plan import SampleSpec, sample_spec
from engine.request import SamplingParams
from engine.sampler import adjust_logits
from tests.helpers import run_alone, run_beside, tokens_of

PROMPT = [17, 4242, 911, 30000, 5, 77, 1234]
EOS = 2  # the default tokenizer's, which the tiny model shares
PENALIZED = SamplingParams(max_tokens=14, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3,
                           logit_bias={1234: 3.0, 911: -2.0}, min_tokens=5, ignore_eos=True)


def with_(params: SamplingParams, **changes) -> SamplingParams:
    return SamplingParams(**{**{k: getattr(params, k) for k in params.__dataclass_fields__}, **changes})


# ---- the maths against a plain per-row implementation ---------------------------------------------------------
def reference_row(logits: list[float], spec: SampleSpec) -> list[float]:
    """One row, token by token, as vLLM documents it: min_tokens, logit_bias, repetition, frequency, presence."""
    x, p = list(logits), spec.params
    for t in spec.suppressed:
        x[t] = -math.inf
    for t, b in p.logit_bias:
        x[t] += b
    counts = Counter(spec.output_ids)
    if p.repetition_penalty != 1:
        for t in set(spec.prompt_ids) | set(counts):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in counts.items():
        x[t] -= p.frequency_penalty * c
    for t in counts:
        x[t] -= p.presence_penalty
    return x


def random_spec(rng: random.Random, vocab: int) -> SampleSpec:
    """Any mix of the adjustments (or none), over short histories full of repeats."""
    pick = rng.random
    if pick() < 0.25:
        return SampleSpec(SamplingParams(max_tokens=40, temperature=0.5), seed=0, index=rng.randrange(40))
    params = SamplingParams(
        max_tokens=40,
        presence_penalty=rng.choice([0.0, 0.0, -1.5, 0.8, 2.0]),
        frequency_penalty=rng.choice([0.0, 0.0, -0.3, 1.1]),
        repetition_penalty=rng.choice([1.0, 1.0, 0.7, 1.3, 2.5]),
        logit_bias={rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.choice([0, 0, 1, 5]))},
        min_tokens=rng.choice([0, 0, 3, 40]),
        stop_token_ids=tuple(rng.sample(range(vocab), rng.choice([0, 2]))),
        ignore_eos=pick() < 0.3,
    )
    prompt = [rng.randrange(vocab // 4) for _ in range(rng.randint(1, 30))]
    output = [rng.randrange(vocab // 4) for _ in range(rng.randint(0, 25))]
    return sample_spec(prompt, output, params, seed=0, eos_token_ids={EOS, 5})


def test_adjust_logits_equals_the_per_row_reference() -> None:
    rng, vocab = random.Random(0), 300
    specs = [random_spec(rng, vocab) for _ in range(40)]
    assert sum(s.adjusts_logits for s in specs) >= 20 and sum(not s.adjusts_logits for s in specs) >= 5
    assert any(s.suppressed for s in specs) and any(s.params.repetition_penalty != 1 for s in specs)
    logits = torch.randn(len(specs), vocab, generator=torch.Generator().manual_seed(1)) * 4  # float32, like the runner's
    raw = logits.clone()
    got = adjust_logits(logits, specs)
    assert torch.equal(logits, raw)  # the raw logits are left for logprobs
    assert got.dtype == logits.dtype
    for r, spec in enumerate(specs):
        ref = torch.tensor(reference_row(logits[r].tolist(), spec), dtype=torch.float64)  # Python floats
        assert torch.equal(got[r], ref.to(torch.float32)), (r, spec)  # computed in float64, rounded once
        alone = adjust_logits(logits[r : r + 1], [spec])  # batch-invariant: the row alone gives the same
        assert torch.equal(alone[0], got[r])


def test_rows_without_adjustments_take_the_logits_as_they_are() -> None:
    logits = torch.randn(3, 50)
    plain = [SampleSpec(SamplingParams(temperature=0.7, min_tokens=0), seed=1, index=i) for i in range(3)]
    assert adjust_logits(logits, plain) is logits  # nothing computed, nothing copied
    spec = sample_spec([1], [], SamplingParams(max_tokens=4, min_tokens=2), 0, {EOS})
    assert spec.suppressed == (EOS,) and spec.adjusts_logits  # EOS suppressed at index 0 ...
    assert not sample_spec([1], [3, 4], SamplingParams(max_tokens=4, min_tokens=2), 0, {EOS}).adjusts_logits  # ... not at 2


def test_a_huge_repetition_division_stays_finite() -> None:
    logits = torch.tensor([[3.0, -2.0, 0.0, 1.0]])
    spec = sample_spec([0, 1, 2], [], SamplingParams(repetition_penalty=1e-320, temperature=1.0), 0, set())
    x = adjust_logits(logits, [spec])
    assert not x.isnan().any() and not x.isinf().any() and int(x.argmax()) == 0
    assert float(x[0, 0]) == torch.finfo(torch.float32).max and float(x[0, 2]) == 0.0


# ---- each feature, on the engine ------------------------------------------------------------------------------
def test_logit_bias_100_forces_a_token_under_greedy(tiny_model) -> None:
    plain = tokens_of(run_alone(tiny_model, PROMPT, SamplingParams(max_tokens=8, ignore_eos=True)))
    forced = 4321
    assert forced not in plain
    outs = run_alone(tiny_model, PROMPT, SamplingParams(max_tokens=8, ignore_eos=True, logit_bias={forced: 100}))
    assert tokens_of(outs) == [forced] * 8
    banned = SamplingParams(max_tokens=8, ignore_eos=True, logit_bias={plain[0]: -100})
    assert tokens_of(run_alone(tiny_model, PROMPT, banned))[0] != plain[0]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_min_tokens_blocks_eos_and_stop_token_ids(tiny_model, temperature: float) -> None:
    """A +100 bias makes EOS (or a stop id) all but certain; min_tokens holds it off for exactly that long."""
    base = SamplingParams(max_tokens=12, temperature=temperature, seed=4, ignore_eos=False)
    eager = with_(base, logit_bias={EOS: 100})
    outs = run_alone(tiny_model, PROMPT, eager)
    assert tokens_of(outs) == [EOS] and outs[-1].finish_reason == "stop"  # without min_tokens: at once
    for n in (1, 6):
        outs = run_alone(tiny_model, PROMPT, with_(eager, min_tokens=n))
        got = tokens_of(outs)
        assert EOS not in got[:n] and got[n:] == [EOS] and outs[-1].finish_reason == "stop", (n, got)
    stop_id = 999
    outs = run_alone(tiny_model, PROMPT, with_(base, logit_bias={stop_id: 100}, stop_token_ids=(stop_id,), min_tokens=4))
    assert tokens_of(outs)[4:] == [stop_id] and stop_id not in tokens_of(outs)[:4]
    # ignore_eos: EOS does not stop the request, so min_tokens leaves it alone (vLLM's rule).
    outs = run_alone(tiny_model, PROMPT, with_(eager, ignore_eos=True, min_tokens=3, max_tokens=5))
    assert tokens_of(outs) == [EOS] * 5 and outs[-1].finish_reason == "length"


def test_penalties_change_a_repetitive_greedy_output(tiny_model) -> None:
    plain = tokens_of(run_alone(tiny_model, PROMPT, SamplingParams(max_tokens=10, ignore_eos=True)))
    assert len(set(plain)) <= 3  # the random tiny model repeats itself: the case penalties are for
    for field, value in (("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 3.0)):
        got = tokens_of(run_alone(tiny_model, PROMPT, SamplingParams(max_tokens=10, ignore_eos=True, **{field: value})))
        assert got != plain and len(set(got)) > len(set(plain)), field


def test_logprobs_stay_the_raw_models(tiny_small_vocab_model) -> None:
    """vLLM's default: a token's logprob is the model's log_softmax, before bias, penalties or min_tokens."""
    loaded = tiny_small_vocab_model
    prompt = [17, 424, 911, 300, 5, 77, 123]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2, logit_bias={700: 100}, frequency_penalty=1.0)
    outs = run_alone(loaded, prompt, params)
    tokens = tokens_of(outs)
    assert tokens == [700] * 6
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    ref = torch.log_softmax(logits.to(torch.float64), dim=-1)  # [tokens, V]
    got = [lp for o in outs for lp in o.logprobs]
    assert [lp.logprob for lp in got] == pytest.approx(ref[:, 700].tolist(), abs=1e-6)
    assert all(lp.logprob < -1.0 for lp in got)  # far from the ~0 the biased distribution would give
    assert [[t for t, _ in lp.top] for lp in got] == torch.topk(ref, 2).indices.tolist()


# ---- per request: the same tokens alone and in any batch ---------------------------------------------------------
def others(seed: int, n: int = 6) -> dict[int, list[tuple[str, list[int], SamplingParams]]]:
    """Requests with other adjustments (and none), arriving at random iterations."""
    rng = random.Random(seed)
    schedule: dict[int, list] = {}
    for i in range(n):
        ids = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 10))]
        params = SamplingParams(
            max_tokens=rng.randint(4, 12), temperature=rng.choice([0.0, 0.9]), seed=rng.randrange(1000),
            presence_penalty=rng.choice([0.0, -1.0, 1.5]), frequency_penalty=rng.choice([0.0, 0.5]),
            repetition_penalty=rng.choice([1.0, 1.2, 0.8]), min_tokens=rng.choice([0, 3]),
            logit_bias={rng.randrange(49152): rng.choice([-30.0, 8.0])}, ignore_eos=rng.random() < 0.5,
        )
        schedule.setdefault(rng.choice([0, 1, 2, 4, 6]), []).append((f"o{i}", ids, params))
    return schedule


@pytest.mark.parametrize("policy", ["baton-pd", "baton", "orca", "static"])
@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_adjusted_request_is_the_same_alone_and_batched(tiny_model, policy: str, temperature: float) -> None:
    target = with_(PENALIZED, temperature=temperature, seed=11, stop_token_ids=(EOS,))
    alone = tokens_of(run_alone(tiny_model, PROMPT, target, policy=policy))
    unadjusted = SamplingParams(max_tokens=14, temperature=temperature, seed=11, ignore_eos=True)
    assert alone != tokens_of(run_alone(tiny_model, PROMPT, unadjusted, policy=policy))  # the adjustments act
    schedule = others(seed=3)
    outs = run_beside(tiny_model, PROMPT, target, schedule, policy=policy)
    assert tokens_of(outs["target"]) == alone
    for rid, ids, params in (w for ws in schedule.values() for w in ws):  # and so did every other request
        assert tokens_of(outs[rid]) == tokens_of(run_alone(tiny_model, ids, params, policy=policy)), rid

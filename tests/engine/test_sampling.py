"""Sampling is per request and reproducible whatever the batch (docs/architecture.md, "Exactness"); stop conditions; abort."""

from __future__ import annotations

import random

import pytest
import torch

from engine.request import SamplingParams
from engine.sampler import draw_uniform, filtered_probs, sample, sample_one
from tests.helpers import make_engine, run_alone, run_beside, run_to_completion, tokens_of

SAMPLED = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, top_p=0.9, seed=123, ignore_eos=True)
TARGET_PROMPT = [17, 4242, 911, 30000, 5, 77, 1234]


def text_of(outs: list) -> str:
    return "".join(o.text for o in outs)


def random_others(seed: int, n: int = 6) -> dict[int, list[tuple[str, list[int], SamplingParams]]]:
    rng = random.Random(seed)
    schedule: dict[int, list] = {}
    for i in range(n):
        ids = [rng.randrange(3, 49152) for _ in range(rng.randint(1, 10))]
        params = SamplingParams(max_tokens=rng.randint(3, 10), temperature=rng.choice([0.0, 0.7, 1.3]),
                                top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.8]), seed=rng.randrange(1000),
                                ignore_eos=True)
        schedule.setdefault(rng.choice([0, 1, 2, 4, 6, 9]), []).append((f"o{i}", ids, params))
    return schedule


@pytest.mark.parametrize("policy", ["baton-pd", "orca"])
def test_seeded_sampling_is_independent_of_the_batch(tiny_model, policy: str) -> None:
    alone = tokens_of(run_alone(tiny_model, TARGET_PROMPT, SAMPLED, policy=policy))
    assert len(alone) == SAMPLED.max_tokens and len(set(alone)) > 3  # really sampled, not a repeated argmax
    outs = run_beside(tiny_model, TARGET_PROMPT, SAMPLED, random_others(seed=1), policy=policy)
    assert tokens_of(outs["target"]) == alone
    assert all(outs[rid][-1].finish_reason == "length" for rid in outs)


def test_different_seeds_give_different_outputs(tiny_model) -> None:
    a = tokens_of(run_alone(tiny_model, TARGET_PROMPT, SAMPLED))
    b = tokens_of(run_alone(tiny_model, TARGET_PROMPT, SamplingParams(**{**_fields(SAMPLED), "seed": 124})))
    assert a != b
    assert a == tokens_of(run_alone(tiny_model, TARGET_PROMPT, SAMPLED))


def test_unseeded_requests_derive_a_reproducible_seed_from_their_id(tiny_model) -> None:
    params = SamplingParams(**{**_fields(SAMPLED), "seed": None, "max_tokens": 6})

    def run(rid: str, engine_seed: int = 0) -> list[int]:
        engine = make_engine(tiny_model, seed=engine_seed)
        engine.add_request(rid, prompt_token_ids=TARGET_PROMPT, sampling_params=params)
        return tokens_of(run_to_completion(engine)[rid])

    assert run("x") == run("x")
    assert run("x") != run("y")
    assert run("x") != run("x", engine_seed=1)


def test_top_k_1_equals_greedy(tiny_model) -> None:
    top1 = SamplingParams(max_tokens=8, temperature=0.8, top_k=1, seed=5, ignore_eos=True)
    greedy = SamplingParams(max_tokens=8, ignore_eos=True)
    assert tokens_of(run_alone(tiny_model, TARGET_PROMPT, top1)) == tokens_of(
        run_alone(tiny_model, TARGET_PROMPT, greedy))


def _fields(p: SamplingParams) -> dict:
    return {k: getattr(p, k) for k in p.__dataclass_fields__}


# ---- sampler units ---------------------------------------------------------------------------------------


def _logits(n: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3


@pytest.mark.parametrize("k", [1, 2, 17, 199])
def test_top_k_keeps_exactly_k(k: int) -> None:
    logits = _logits()
    probs = filtered_probs(logits, SamplingParams(temperature=0.7, top_k=k))
    kept = set(torch.nonzero(probs).squeeze(1).tolist())
    assert kept == set(torch.topk(logits, k).indices.tolist())
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    full = torch.softmax(logits / 0.7, -1)
    idx = sorted(kept)
    ratio = probs[idx] / full[idx]  # survivors keep their relative odds
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_minimal_prefix(top_p: float) -> None:
    logits = _logits(seed=3)
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=top_p))
    full = torch.softmax(logits, -1)
    order = torch.argsort(full, descending=True)
    cum = torch.cumsum(full[order], 0)
    m = int((cum < top_p).sum()) + 1  # the smallest prefix whose mass reaches top_p
    assert set(torch.nonzero(probs).squeeze(1).tolist()) == set(order[:m].tolist())
    assert cum[m - 1] >= top_p and (m == 1 or cum[m - 2] < top_p)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(probs[order[:m]], full[order[:m]] / cum[m - 1])


def test_top_k_and_top_p_compose_and_temperature_scales() -> None:
    logits = _logits(seed=5)
    plain = filtered_probs(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(plain, torch.softmax(logits / 0.5, -1))
    both = filtered_probs(logits, SamplingParams(temperature=0.5, top_k=10, top_p=0.6))
    only_k = filtered_probs(logits, SamplingParams(temperature=0.5, top_k=10))
    kept = torch.nonzero(both).squeeze(1)
    assert 1 <= kept.numel() <= 10 and bool((only_k[kept] > 0).all())
    assert both.sum().item() == pytest.approx(1.0, abs=1e-12)


def test_draw_uniform_is_a_pure_function_of_seed_and_index() -> None:
    a = [draw_uniform(123, i) for i in range(20)]
    torch.manual_seed(999)  # the global generator must not matter
    torch.rand(10)
    assert a == [draw_uniform(123, i) for i in range(20)]
    assert all(0.0 <= u < 1.0 for u in a)
    assert len(set(a)) == 20
    assert a != [draw_uniform(124, i) for i in range(20)]
    assert draw_uniform(2**62, 5) == draw_uniform(2**62, 5)  # large seeds are folded, not rejected


def test_sample_one_follows_the_distribution_and_never_picks_a_filtered_token() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64))
    params = SamplingParams(temperature=1.0, top_k=3)
    counts = [0, 0, 0, 0]
    for seed in range(3000):
        counts[sample_one(logits, params, seed, 0)] += 1
    assert counts[3] == 0
    expected = [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95]
    for c, e in zip(counts[:3], expected, strict=True):
        assert abs(c / 3000 - e) < 0.05


def test_sample_mixes_greedy_and_sampled_rows() -> None:
    logits = torch.stack([_logits(seed=s) for s in range(3)])
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1), SamplingParams()]
    out = sample(logits, params, [0, 1, 2], [0, 0, 0])
    assert out[0] == int(logits[0].argmax()) and out[2] == int(logits[2].argmax())
    assert out[1] == sample_one(logits[1], params[1], 1, 0)


# ---- stop conditions ---------------------------------------------------------------------------------------


def _stop_step(tokens: list[int]) -> int:
    """The first step k >= 3 whose token did not appear before it."""
    for k in range(3, len(tokens)):
        if tokens[k] not in tokens[:k]:
            return k
    raise AssertionError(f"no fresh token in {tokens}")


def test_eos_and_stop_token_ids_stop_exactly_there(tiny_model) -> None:
    base = SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=7, ignore_eos=True)
    ref = tokens_of(run_alone(tiny_model, TARGET_PROMPT, base))
    k = _stop_step(ref)
    stop_tok = ref[k]
    prefix_text = text_of(run_alone(tiny_model, TARGET_PROMPT, SamplingParams(**{**_fields(base), "max_tokens": k})))
    assert 2 in make_engine(tiny_model).outputs.eos_token_ids  # the tokenizer's EOS is known to the engine

    def check(outs: list) -> None:
        assert tokens_of(outs) == ref[: k + 1]  # the stopping token is returned ...
        assert text_of(outs) == prefix_text  # ... but adds no text
        last = outs[-1]
        assert last.finished and last.finish_reason == "stop"
        assert last.usage.completion_tokens == k + 1 and last.usage.prompt_tokens == len(TARGET_PROMPT)

    by_id = SamplingParams(**{**_fields(base), "stop_token_ids": (stop_tok,), "ignore_eos": False})
    check(run_alone(tiny_model, TARGET_PROMPT, by_id))
    by_id_ignoring_eos = SamplingParams(**{**_fields(base), "stop_token_ids": (stop_tok,)})
    check(run_alone(tiny_model, TARGET_PROMPT, by_id_ignoring_eos))  # ignore_eos does not affect stop ids

    for ignore_eos in (False, True):  # the same token as the model's EOS
        engine = make_engine(tiny_model)
        engine.outputs.eos_token_ids = {stop_tok}
        engine.add_request("e", prompt_token_ids=TARGET_PROMPT,
                           sampling_params=SamplingParams(**{**_fields(base), "ignore_eos": ignore_eos}))
        outs = run_to_completion(engine)["e"]
        if ignore_eos:
            assert tokens_of(outs) == ref and outs[-1].finish_reason == "length"
        else:
            check(outs)


def test_max_tokens_finishes_with_length(tiny_model) -> None:
    for n in (1, 2, 7):
        outs = run_alone(tiny_model, TARGET_PROMPT, SamplingParams(max_tokens=n, ignore_eos=True))
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason == "length"
        assert outs[-1].usage.completion_tokens == n == len(tokens_of(outs))
        assert outs[-1].usage.total_tokens == n + len(TARGET_PROMPT)


def test_stop_string_across_token_boundaries(default_model) -> None:
    tok = default_model.tokenizer
    prompt = "The capital of France is"
    prompt_ids = tok.encode(prompt)
    ref_outs = run_alone(default_model, prompt_ids, SamplingParams(max_tokens=10, ignore_eos=True))
    ref, full = tokens_of(ref_outs), text_of(ref_outs)
    base = len(tok.decode(prompt_ids))
    # bounds[j]: where the text of output token j starts in `full`
    bounds = [len(tok.decode(prompt_ids + ref[:j])) - base for j in range(len(ref) + 1)]
    assert bounds[-1] == len(full)
    for i in range(1, len(ref) - 1):
        b = bounds[i + 1]  # boundary between token i and token i + 1
        if bounds[i] <= b - 2 and b + 2 <= bounds[i + 2] and full.find(full[b - 2 : b + 2]) == b - 2:
            break
    else:
        pytest.fail(f"no token boundary to stop on in {full!r}")
    stop = full[b - 2 : b + 2]
    outs = run_alone(default_model, prompt_ids, SamplingParams(max_tokens=10, stop=[stop], ignore_eos=True))
    assert text_of(outs) == full[: b - 2]
    assert stop not in text_of(outs)
    assert i + 2 < 10 and tokens_of(outs) == ref[: i + 2]  # stopped on the token that completed the stop string
    assert outs[-1].finish_reason == "stop" and outs[-1].usage.completion_tokens == i + 2


# ---- abort ----------------------------------------------------------------------------------------------------


def test_abort_mid_generation(tiny_model) -> None:
    reqs = {
        rid: ([11 + n, 500 * n + 3, 42][: n + 1], SamplingParams(max_tokens=10, temperature=0.9, seed=n,
                                                                ignore_eos=True))
        for n, rid in enumerate(["a", "b", "c", "d"])
    }
    engine = make_engine(tiny_model, policy="baton-pd", max_batch_size=3)
    for rid, (ids, params) in reqs.items():
        engine.add_request(rid, prompt_token_ids=ids, sampling_params=params)
    outs: dict[str, list] = {}

    def step() -> None:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)

    for _ in range(4):
        step()
    assert "b" in engine.cache.ids and "d" not in engine.cache.ids
    rows = engine.cache.rows
    got_b = len(tokens_of(outs["b"]))
    engine.abort_request("b")
    assert engine.cache.rows == rows - 1 and "b" not in engine.cache.ids  # left the batch at once
    assert engine.stats.running == rows - 1
    engine.abort_request("d")  # waiting or in the prefilled pool: never got a row
    engine.abort_request("nobody")  # unknown ids are ignored
    step()
    assert outs["b"][-1].finished and outs["b"][-1].finish_reason == "abort"
    assert len(tokens_of(outs["b"])) == got_b  # nothing generated after the abort
    assert outs["d"][-1].finish_reason == "abort" and len(tokens_of(outs["d"])) <= 1
    while engine.has_unfinished_requests():
        step()
    for rid in ("a", "c"):
        assert outs[rid][-1].finish_reason == "length"
        assert tokens_of(outs[rid]) == tokens_of(run_alone(tiny_model, *reqs[rid])), rid
    assert sum(o.finished for o in outs["b"]) == 1
    assert engine.stats.aborted_requests == 2 and engine.stats.finished_requests == 2


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-12, 1e-7])
def test_a_tiny_temperature_is_greedy_not_garbage(temperature: float) -> None:
    """A temperature of 1e-310 used to overflow the logits to inf, the probabilities to NaN, and the draw to
    the last vocabulary id; below the sampler's epsilon it is greedy, on every path."""
    torch.manual_seed(0)
    logits = torch.randn(2, 500) * 4
    best = logits.argmax(dim=-1).tolist()
    params = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, seed=1)
    assert params.greedy  # the one rule every sampling path asks
    probs = filtered_probs(logits[0], params)
    assert not probs.isnan().any() and int(probs.argmax()) == best[0] and float(probs.max()) == 1.0
    for index in range(5):
        assert sample_one(logits[0], params, seed=index, index=index) == best[0]
    assert sample(logits, [params, params], [3, 4], [0, 7]) == best


def test_small_temperatures_above_the_epsilon_still_sample_without_nan() -> None:
    """Just above the epsilon the maths stays finite (the max logit is subtracted before scaling), and the
    draw is still a pure function of (seed, index)."""
    logits = torch.tensor([0.0, 1e-5, 2e-5, -50.0], dtype=torch.float32)
    params = SamplingParams(temperature=1e-4, seed=9)
    probs = filtered_probs(logits, params)
    assert torch.isfinite(probs).all() and float(probs.sum()) == pytest.approx(1.0)
    draws = [sample_one(logits, params, seed=9, index=i) for i in range(20)]
    assert draws == [sample_one(logits, params, seed=9, index=i) for i in range(20)]
    assert set(draws) <= {0, 1, 2} and len(set(draws)) > 1


def test_nan_logits_never_become_a_token() -> None:
    logits = torch.tensor([0.1, float("nan"), 0.3])
    with pytest.raises(ValueError, match="NaN"):
        sample_one(logits, SamplingParams(temperature=0.7, seed=1), seed=1, index=0)
    with pytest.raises(ValueError, match="NaN"):
        sample(logits[None, :], [SamplingParams(temperature=0.0)], [1], [0])


def test_the_compiled_argmax_picks_what_torch_argmax_picks() -> None:
    """`sampler.argmax_rows` (the compiled two-pass scan on CPU float32) against `torch.argmax` on rows of every kind:
    random logits of vocabulary widths with and without a vector tail, ties for the maximum (the first wins), -0.0
    against 0.0, all -inf, +inf twice, a NaN before and after the maximum (the first NaN wins), and a single column;
    and rows it does not take (not contiguous) through ATen's."""
    from engine import cpu_kernel, sampler

    gen = torch.Generator().manual_seed(3)
    for width in (1, 5, 16, 17, 49152, 49157):
        rows = torch.randn(16, width, generator=gen) * 5
        if width >= 17:
            rows[1, 3] = rows[1, 12] = rows[1].max() + 1  # a tie: the first one
            rows[2] = float("-inf")
            rows[3, [2, 9]] = float("inf")
            rows[4, width - 1] = float("nan")  # after the maximum
            rows[5, 0] = float("nan")  # before everything
            rows[5, 7] = float("nan")
            rows[6] = 0.0
            rows[6, 4] = -0.0
            rows[7, width - 2] = rows[7].max() + 1  # in the tail
        want = rows.argmax(dim=-1)
        assert torch.equal(sampler.argmax_rows(rows), want), width
        if cpu_kernel.captured_llama() is not None:  # the compiled scan itself
            assert torch.equal(torch.ops.baton_captured.argmax_rows(rows), want), width
    transposed = torch.randn(40, 3, generator=gen).t()  # not contiguous: ATen's argmax, the same answer
    assert torch.equal(sampler.argmax_rows(transposed), transposed.argmax(dim=-1))

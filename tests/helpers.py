"""Helpers shared by the tests."""

from __future__ import annotations


def make_engine(loaded, **overrides):
    """A BatonEngine over an already loaded model (no reload)."""
    from configs import EngineConfig
    from engine import BatonEngine

    return BatonEngine(EngineConfig(**overrides), loaded=loaded)


def run_to_completion(engine, max_iterations: int = 100_000, check=None):
    """Step until nothing is unfinished; returns {request_id: [RequestOutput, ...]}."""
    outs: dict[str, list] = {}
    for _ in range(max_iterations):
        if not engine.has_unfinished_requests():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        if check is not None:
            check(engine)
    raise AssertionError("engine did not finish")


def tokens_of(outs: list) -> list[int]:
    """Every token id of one request's outputs, in order."""
    return [t for o in outs for t in o.new_token_ids]


def run_alone(loaded, ids: list[int], params, **cfg) -> list:
    """One request alone in a fresh engine (`cfg`: its config); its outputs."""
    engine = make_engine(loaded, **cfg)
    engine.add_request("alone", prompt_token_ids=ids, sampling_params=params)
    return run_to_completion(engine)["alone"]


def run_beside(loaded, ids: list[int], params, schedule: dict[int, list[tuple]], **cfg) -> dict[str, list]:
    """A request "target" joining at iteration 2 among the `schedule`'s requests (at most 8 rows); every
    request's outputs. Fails unless the batch really held three rows or more at some point."""
    schedule = {**schedule, 2: [*schedule.get(2, []), ("target", ids, params)]}
    engine = make_engine(loaded, max_batch_size=8, **cfg)
    outs = run_schedule(engine, schedule)
    assert max(it.rows for it in engine.stats.history) >= 3  # it really shared the batch
    return outs


def run_schedule(engine, schedule: dict[int, list[tuple]]) -> dict[str, list]:
    """Add each request at its iteration; step until everything has finished."""
    outs: dict[str, list] = {}
    it = 0
    while engine.has_unfinished_requests() or any(i >= it for i in schedule):
        for rid, ids, params in schedule.get(it, []):
            engine.add_request(rid, prompt_token_ids=ids, sampling_params=params)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        it += 1
        assert it < 1000
    return outs


def random_workload(seed: int, n: int, vocab: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int],
                    arrival_span: int, skew_outputs: bool = False) -> list[dict]:
    """Requests with random token prompts, lengths and arrival iterations (deterministic in `seed`).

    With `skew_outputs`, output lengths are exponential (mean a quarter of the range) clipped to the range,
    and the last request takes the longest output, so the range is still covered end to end."""
    import random

    rng = random.Random(seed)
    lo = min(100, vocab // 4)  # keep clear of special tokens at the start of the vocabulary

    def out_len(i: int) -> int:
        if not skew_outputs:
            return rng.randint(*max_tokens)
        if i == n - 1:
            return max_tokens[1]
        return min(max_tokens[1], max_tokens[0] + int(rng.expovariate(4 / (max_tokens[1] - max_tokens[0]))))

    return [
        {
            "id": f"req{i}",
            "prompt": [rng.randrange(lo, vocab) for _ in range(rng.randint(*prompt_len))],
            "max_tokens": out_len(i),
            "arrival": rng.randint(0, arrival_span),
        }
        for i in range(n)
    ]


def solo_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """What `model.generate(do_sample=False)` gives for this prompt alone, without stopping at EOS."""
    import torch
    from transformers import GenerationConfig

    ids = torch.tensor([prompt])
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    return out[0, len(prompt):].tolist()


def run_workload(engine, workload: list[dict], check=None) -> dict[str, list[int]]:
    """Submit each request at its arrival iteration (greedy, EOS ignored); return tokens per request."""
    from engine import SamplingParams

    pending = sorted(workload, key=lambda w: w["arrival"])
    tokens: dict[str, list[int]] = {w["id"]: [] for w in workload}
    finished: set[str] = set()
    for _ in range(1_000_000):
        while pending and pending[0]["arrival"] <= engine.iteration:
            w = pending.pop(0)
            engine.add_request(w["id"], prompt_token_ids=w["prompt"],
                               sampling_params=SamplingParams(max_tokens=w["max_tokens"], ignore_eos=True))
        if not pending and not engine.has_unfinished_requests():
            break
        for o in engine.step():
            tokens[o.request_id].extend(o.new_token_ids)
            if o.finished:
                assert o.finish_reason == "length", (o.request_id, o.finish_reason, o.error)
                finished.add(o.request_id)
        if check is not None:
            check(engine)
    assert finished == set(tokens), f"unfinished: {set(tokens) - finished}"
    return tokens


def mismatches(got: dict[str, list[int]], ref: dict[str, list[int]]) -> list[str]:
    return [rid for rid in ref if got.get(rid) != ref[rid]]


# bfloat16 on a CPU without native bf16 (no AVX512-BF16, no AMX): every bf16 matmul converts to float32 and back,
# so a bf16 forward costs ~6x a float32 one (the sixteen prompts below: 51 s against 8 s at one thread on an
# AVX2-only AMD EPYC). There the bf16 variants of the heaviest exactness tests take prompts of at most this many
# tokens: the same checks over several attention-window widths, a third of the work.
EMULATED_BF16_PROMPT_CAP = 96


def bf16_emulated(loaded) -> bool:
    """Whether `loaded` computes in bfloat16 on a CPU that has no native bf16."""
    import torch

    from engine.model_loader import cpu_has_native_bf16

    return loaded.dtype is torch.bfloat16 and loaded.device.type == "cpu" and not cpu_has_native_bf16()


def prompt_range(loaded, lo: int, hi: int) -> tuple[int, int]:
    """A test's range of prompt lengths: (lo, hi), capped at EMULATED_BF16_PROMPT_CAP where bf16 is emulated."""
    return (lo, min(hi, EMULATED_BF16_PROMPT_CAP)) if bf16_emulated(loaded) else (lo, hi)


# Sixteen prompts whose lengths give a batch left padding of every width (16-250 tokens, random ids >= 100).
SIXTEEN_LENGTHS = (40, 200, 17, 120, 90, 33, 250, 60, 16, 180, 75, 140, 25, 220, 100, 50)
_SIXTEEN: dict[int, list] = {}


def sixteen_prefilled(loaded) -> list:
    """The sixteen prompts' KV (`RowKV`s), each prefilled alone by the eager forward; made once per model in a
    test process (several decode-step tests batch them; `BatchKVCache.insert` copies, so nobody changes them)."""
    import torch

    from engine import model_runner

    key = id(loaded.model)
    if key not in _SIXTEEN:
        runner = model_runner.ModelRunner(loaded.model, loaded.device, captured_forward=False)
        gen = torch.Generator().manual_seed(7)
        _SIXTEEN[key] = [runner.prefill(torch.randint(100, 40000, (n,), generator=gen).tolist())[0]
                         for n in SIXTEEN_LENGTHS]
    return _SIXTEEN[key]

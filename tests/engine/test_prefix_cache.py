"""Prefix caching (engine/prefix_cache.py; docs/architecture.md, "Prefix caching").

The cache's own rules (chained block keys, the longest whole-block prefix that leaves a token to compute, LRU
eviction from the ends of prefixes); the runner's prefill on top of cached KV against a full prefill (and
that the comparison fails with wrong positions or a wrong mask); the controller spending the cache before any
row; and exactness: a request served from the cache gives the tokens it gives without it, greedy and seeded,
under baton and baton-pd, in float64 (tiny model) and float32/bfloat16 (the default model).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch

from autoscaler.probes.base import MemoryReading
from configs import EngineConfig
from configs.controller import ControllerConfig
from engine import BatonEngine, SamplingParams, model_runner
from engine.kv_cache import RowKV
from engine.memory_controller import MemoryController, decide_capacity
from engine.prefix_cache import PrefixCache, block_keys
from tests.engine.test_memory_controller import CONFIG, row, snap
from tests.helpers import make_engine, run_to_completion, tokens_of

CHUNK = 32  # prefill chunk = prefix-cache block in these tests, with and without the cache alike


def _kv(n: int, start: int = 0) -> RowKV:
    """A fake row of `n` tokens whose every value names its column (start, start + 1, ...)."""
    cols = torch.arange(start, start + n, dtype=torch.float64)[None, None, :, None].expand(2, 1, n, 3)
    return RowKV(cols.clone(), -cols.clone())


# ---- the cache's rules ------------------------------------------------------------------------------------------
def test_block_keys_chain_every_token_before_them() -> None:
    a, b = list(range(100, 164)), list(range(100, 164))
    b[3] = 7  # differs in the first block only
    ka, kb = block_keys(a, 32), block_keys(b, 32)
    assert len(ka) == 2 and len(block_keys(a[:63], 32)) == 1  # whole blocks only
    assert ka[0] != kb[0] and ka[1] != kb[1]  # the second block's tokens agree, but not what came before
    assert block_keys(a[:32] + [1] * 32, 32)[0] == ka[0]


def test_lookup_gives_the_longest_whole_block_prefix_and_leaves_a_token() -> None:
    cache = PrefixCache(block_size=4, max_tokens=64)
    prompt = list(range(100, 112))  # 3 blocks
    cache.insert(prompt, _kv(12))
    cache.check_invariants()
    assert cache.lookup(prompt) is not None and cache.lookup(prompt).length == 8  # 12 would leave nothing
    hit = cache.lookup(prompt + [5, 6])
    assert hit is not None and hit.length == 12 and torch.equal(hit.keys, _kv(12).keys)
    assert cache.lookup(prompt[:4] + [1, 2, 3, 4, 5]).length == 4  # diverges in the second block
    assert cache.lookup([1] + prompt) is None
    assert cache.lookup(prompt[:4]) is None  # one block, but its last token must be computed


def test_eviction_takes_the_ends_of_prefixes_first_and_respects_the_bound() -> None:
    cache = PrefixCache(block_size=4, max_tokens=24)  # 6 blocks
    shared = list(range(100, 108))
    a, b = shared + [1, 2, 3, 4], shared + [5, 6, 7, 8, 9, 9, 9, 9]
    cache.insert(a, _kv(12))
    cache.insert(b, _kv(16))
    cache.check_invariants()
    assert cache.tokens == 20
    cache.insert(list(range(200, 212)), _kv(12))  # 3 new blocks: 2 of the oldest ends must go
    cache.check_invariants()
    assert cache.tokens == 24 and cache.evicted_blocks == 2
    assert cache.lookup(a + [0]).length == 8  # a's end was the least recently used
    assert cache.lookup(b + [0]).length == 12  # b lost its last block only; the shared blocks stay
    freed = cache.evict(cache.nbytes())
    assert freed > 0 and cache.nbytes() == 0 and cache.lookup(b + [0]) is None
    cache.check_invariants()


def test_a_zero_bound_keeps_nothing() -> None:
    cache = PrefixCache(block_size=4, max_tokens=0)
    cache.insert(list(range(100, 112)), _kv(12))
    assert cache.nbytes() == 0 and cache.lookup(list(range(100, 113))) is None


# ---- the runner: a prefill on top of cached KV is the full prefill ------------------------------------------
@pytest.fixture(scope="module")
def tiny_runner(tiny_model) -> model_runner.ModelRunner:
    return model_runner.ModelRunner(tiny_model.model, tiny_model.device, narrow_linear=False, prefill_chunk=32)


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 40_000) for _ in range(n)]


def _prefill_gap(runner: model_runner.ModelRunner, ids: list[int], cached: int,
                 full: tuple[RowKV, torch.Tensor] | None = None) -> tuple[float, float]:
    """Largest |difference| of KV and of logits between a full prefill (`full`, or computed now) and one on
    top of `cached` tokens."""
    full_kv, full_logits = full if full is not None else runner.prefill(ids)
    prefix = RowKV(full_kv.keys[:, :, :cached].clone(), full_kv.values[:, :, :cached].clone())
    kv, logits = runner.prefill(ids, prefix=prefix)
    assert kv.length == len(ids)
    kv_gap = max((kv.keys - full_kv.keys).abs().max().item(), (kv.values - full_kv.values).abs().max().item())
    return kv_gap, (logits - full_logits).abs().max().item()


@pytest.mark.parametrize("cached,total", [(32, 33), (32, 70), (64, 100)])
def test_prefill_on_a_cached_prefix_equals_a_full_prefill(tiny_runner, cached: int, total: int) -> None:
    kv_gap, logit_gap = _prefill_gap(tiny_runner, _prompt(total), cached)
    assert kv_gap == 0 and logit_gap == 0  # bit for bit: the same chunked forwards


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_on_the_default_model_a_hit_is_bit_for_bit_a_miss(dtype: str, request: pytest.FixtureRequest) -> None:
    """The default model in both dtypes, where one forward over all the rows would round differently from one
    over the uncached rows only: the aligned chunks make a hit's KV and logits the miss's, bit for bit."""
    loaded = request.getfixturevalue("default_model" if dtype == "float32" else "default_model_bf16")
    runner = model_runner.ModelRunner(loaded.model, loaded.device, narrow_linear=False, prefill_chunk=64)
    for cached, total in ((64, 100), (128, 150)):
        assert _prefill_gap(runner, _prompt(total, seed=cached), cached) == (0, 0)


def test_the_comparison_fails_with_wrong_positions_or_mask(tiny_runner, monkeypatch) -> None:
    """The exactness checks above and below can fail: shifted positions, or a mask that hides the cached
    columns, give a different KV."""
    ids = _prompt(70)
    right = model_runner.prefix_inputs

    def shifted(cached: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions, mask = right(cached, total)
        return positions - 1, mask

    def hides_prefix(cached: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions, mask = right(cached, total)
        mask = mask.clone()
        mask[:, : cached // 2] = 0
        return positions, mask

    full = tiny_runner.prefill(ids)  # right: the reference
    for wrong in (shifted, hides_prefix):
        monkeypatch.setattr(model_runner, "prefix_inputs", wrong)
        kv_gap, logit_gap = _prefill_gap(tiny_runner, ids, 32, full)
        assert kv_gap > 1e-6 and logit_gap > 1e-6, wrong.__name__


# ---- the controller spends the cache before any row ----------------------------------------------------------
def _with_cache(s, cached: int):
    """Snapshot `s` with `cached` prefix-cache bytes held by the engine (counted in the reading)."""
    m = s.memory
    reading = MemoryReading(m.used_bytes + cached, m.total_bytes, m.engine_bytes + cached, m.source)
    return replace(s, memory=reading, reclaimable_bytes=cached)


def test_the_controller_evicts_the_cache_instead_of_preempting() -> None:
    rows = (row("a", arrival=0), row("b", arrival=1))  # 200 bytes of KV; high watermark 900
    s = snap(rows, external=600)
    assert decide_capacity(s, CONFIG).evict_bytes == 0
    over = _with_cache(s, 200)  # 1000 used: over the high watermark by ~100 bytes
    d = decide_capacity(over, CONFIG)
    assert d.preempt == () and 100 <= d.evict_bytes <= 110
    # the same bytes held by something the engine cannot drop preempt a row
    held = replace(over, reclaimable_bytes=0)
    assert [p.request_id for p in decide_capacity(held, CONFIG).preempt] == ["b"]
    # a cache too small to cover the excess does not save the row; what the row's leaving frees keeps the cache
    worse = _with_cache(snap(rows, external=750), 50)  # 1000 used; without the cache, still 950
    d = decide_capacity(worse, CONFIG)
    assert [p.request_id for p in d.preempt] == ["b"] and d.evict_bytes == 1  # 100 + 750 + 1 + 50 - 900


# ---- the engine: exactness with and without the cache ----------------------------------------------------------
SHARED = _prompt(70, seed=1)  # two whole 32-token blocks, and a bit


def _workload(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [SHARED + [rng.randrange(100, 40_000) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def _params(i: int, sampled: bool, max_tokens: int) -> SamplingParams:
    if not sampled:
        return SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, seed=100 + i, ignore_eos=True)


def _serve(loaded, prompts: list[list[int]], sampled: bool, max_tokens: int = 6, **cfg) -> tuple[dict, BatonEngine]:
    """Each prompt after the previous has finished (so the cache is filled by then); tokens per request."""
    engine = make_engine(loaded, max_batch_size=4, **{"prefill_chunk_tokens": CHUNK, **cfg})
    tokens: dict[str, list[int]] = {}
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", prompt_token_ids=ids, sampling_params=_params(i, sampled, max_tokens))
        tokens[f"r{i}"] = tokens_of(run_to_completion(engine, check=_check)[f"r{i}"])
    return tokens, engine


def _check(engine: BatonEngine) -> None:
    engine.cache.check_invariants()
    if engine.scheduler.prefixes is not None:
        engine.scheduler.prefixes.check_invariants()


@pytest.mark.parametrize("policy", ["baton", "baton-pd"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_cache_hits_give_the_tokens_of_a_run_without_the_cache(tiny_model, policy: str, sampled: bool) -> None:
    prompts = _workload(5, seed=2) + [_prompt(40, seed=3)]  # the last one misses
    off, _ = _serve(tiny_model, prompts, sampled, policy=policy, prefix_caching=False)
    on, engine = _serve(tiny_model, prompts, sampled, policy=policy, prefix_caching=True)
    assert on == off
    s = engine.stats
    assert s.prefix_hit_tokens == 4 * 64  # every shared prompt after the first hit its two whole blocks
    assert s.prefix_query_tokens == sum(len(p) for p in prompts)
    assert s.summary()["prefix_hit_rate"] == pytest.approx(256 / s.prefix_query_tokens)
    assert s.prefill_tokens < off_prefill_tokens(prompts)  # the cached tokens were not computed


def off_prefill_tokens(prompts: list[list[int]]) -> int:
    return sum(len(p) for p in prompts)


def test_a_concurrent_batch_with_hits_matches_the_run_without_the_cache(tiny_model) -> None:
    """Requests arriving together: the first fills the cache, the later ones hit it while it decodes."""
    prompts = _workload(6, seed=4)

    def together(**cfg) -> tuple[dict, BatonEngine]:
        engine = make_engine(tiny_model, max_batch_size=4, prefill_token_budget=64, prefill_chunk_tokens=CHUNK, **cfg)
        for i, ids in enumerate(prompts):
            engine.add_request(f"r{i}", prompt_token_ids=ids, sampling_params=_params(i, i % 2 == 1, 10))
        return {r: tokens_of(o) for r, o in run_to_completion(engine, check=_check).items()}, engine

    off, _ = together(prefix_caching=False)
    on, engine = together(prefix_caching=True)
    assert on == off and engine.stats.prefix_hit_tokens > 0


def test_the_front_reports_the_counters_for_stats_and_metrics(tiny_model) -> None:
    from deployments import metrics
    from engine import AsyncBatonEngine

    prompts = _workload(3, seed=5)
    _, engine = _serve(tiny_model, prompts, False, prefix_caching=True)
    report = AsyncBatonEngine(engine=engine).metrics()
    assert report["prefix_cache_hit_tokens_total"] == 2 * 64
    assert report["prefix_cache_query_tokens_total"] == sum(len(p) for p in prompts)
    assert report["prefix_cache_bytes"] == engine.scheduler.prefixes.nbytes() > 0
    exported = {key for key, _ in (*metrics._GAUGES.values(), *metrics._COUNTERS.values())}
    assert {"prefix_cache_hit_tokens_total", "prefix_cache_query_tokens_total", "prefix_cache_bytes"} <= exported


def test_no_cache_for_policies_that_compute_prompts_in_the_batch(tiny_model) -> None:
    assert make_engine(tiny_model, policy="orca", prefix_caching=True).scheduler.prefixes is None


# ---- memory pressure: the cache goes first, no row is preempted ---------------------------------------------
@dataclass
class ScriptedProbe:
    """A budget whose other tenant holds `external` bytes, set by the test between steps."""

    budget_bytes: int
    external: int = 0
    name: str = "scripted"
    sees_whole_cache: bool = False

    def read(self, engine_bytes: int, iteration: int) -> MemoryReading:
        return MemoryReading(engine_bytes + self.external, self.budget_bytes, engine_bytes, self.name)


def test_under_pressure_the_cache_is_evicted_and_no_request_preempted(tiny_model) -> None:
    budget = 64 << 20
    controller = ControllerConfig(probe="simulated", memory_budget_bytes=budget)
    config = EngineConfig(max_batch_size=4, prefix_caching=True, prefill_chunk_tokens=CHUNK, controller=controller)
    probe = ScriptedProbe(budget)
    engine = BatonEngine(config, loaded=tiny_model, controller=MemoryController(controller), probe=probe)
    for i in range(6):  # six distinct prompts fill the cache
        engine.add_request(f"fill{i}", prompt_token_ids=_prompt(96, seed=10 + i),
                           sampling_params=SamplingParams(max_tokens=2, ignore_eos=True))
    run_to_completion(engine, check=_check)
    cached = engine.scheduler.prefixes.nbytes()
    assert cached == 6 * 96 * engine.cache.bytes_per_token
    work = {f"w{i}": _prompt(50, seed=20 + i) for i in range(2)}
    for rid, ids in work.items():
        engine.add_request(rid, prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=30, ignore_eos=True))
    tokens: dict[str, list[int]] = {rid: [] for rid in work}
    for _ in range(3):  # both join the batch
        for o in engine.step():
            tokens[o.request_id].extend(o.new_token_ids)
    assert len(engine.cache.ids) == 2
    # Another tenant takes all but half the cache's bytes of the room left under the high watermark.
    high = int(controller.high_watermark * budget)
    peak = engine.scheduler.accounted_bytes(rows=2) + 2 * engine.cache.bytes_per_token
    probe.external = high - peak - 2 * 4096 + cached // 2
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens[o.request_id].extend(o.new_token_ids)
        _check(engine)
    assert engine.stats.preemptions == 0
    assert 0 < engine.scheduler.prefixes.nbytes() <= cached // 2 + 4 * 32 * engine.cache.bytes_per_token
    assert engine.scheduler.prefixes.evicted_blocks >= 6
    alone = {rid: _serve(tiny_model, [ids], False, max_tokens=30)[0]["r0"] for rid, ids in work.items()}
    assert tokens == alone


# ---- the default model: float32 and bfloat16 -----------------------------------------------------------------
@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, default_model, default_model_bf16):
    return default_model if request.param == "float32" else default_model_bf16


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded"])
def test_default_model_hits_give_the_tokens_without_the_cache(model, sampled: bool) -> None:
    tok = model.tokenizer
    system = tok.encode("You are a careful assistant. Answer in one short sentence, plainly, without lists. " * 4)
    questions = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?"]
    prompts = [system + tok.encode(q) for q in questions]
    off, _ = _serve(model, prompts, sampled, max_tokens=8, prefix_caching=False)
    on, engine = _serve(model, prompts, sampled, max_tokens=8, prefix_caching=True)
    assert engine.stats.prefix_hit_tokens == 2 * (len(system) // 32) * 32 > 0
    assert on == off



def test_a_recomputed_request_hits_the_cache_and_keeps_its_tokens(tiny_model) -> None:
    """An urgent arrival displaces a running row by recompute; its re-prefill (prompt + output so far) starts
    from the cached blocks of its prompt, and every request still gets its own tokens."""
    controller = ControllerConfig(probe="simulated", memory_budget_bytes=1 << 40, preemption_mode="recompute",
                                  min_priority_gap=1)
    config = EngineConfig(max_batch_size=2, prefix_caching=True, prefill_chunk_tokens=CHUNK, controller=controller)
    engine = BatonEngine(config, loaded=tiny_model, controller=MemoryController(controller),
                         probe=ScriptedProbe(1 << 40))
    work = {f"w{i}": ids for i, ids in enumerate(_workload(3, seed=6))}
    tokens: dict[str, list[int]] = {rid: [] for rid in work}

    def step() -> None:
        for o in engine.step():
            tokens[o.request_id].extend(o.new_token_ids)
        _check(engine)

    for rid in ("w0", "w1"):
        engine.add_request(rid, prompt_token_ids=work[rid], priority=5,
                           sampling_params=SamplingParams(max_tokens=20, ignore_eos=True))
    while len(engine.cache.ids) < 2 or len(tokens["w1"]) < 5:
        step()
    hits_before = engine.stats.prefix_hit_tokens
    engine.add_request("w2", prompt_token_ids=work["w2"], priority=0,
                       sampling_params=SamplingParams(max_tokens=20, ignore_eos=True))
    while engine.has_unfinished_requests():
        step()
    assert engine.stats.preemptions_by_mode["recompute"] == 1
    # w2's prefill and w1's re-prefill both start after the shared blocks (at least)
    assert engine.stats.prefix_hit_tokens >= hits_before + 2 * 64
    alone = {rid: _serve(tiny_model, [ids], False, max_tokens=20)[0]["r0"] for rid, ids in work.items()}
    assert tokens == alone

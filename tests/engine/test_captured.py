"""The captured forwards (engine/captured.py): compiled operators that must compute exactly what the eager
transformers forward computes, bit for bit, in float32 and bfloat16: a pure decode step (logits and cache columns)
and prompts from scratch, alone or packed (KV and last logits); and must stand aside wherever they do not apply."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine import captured, cpu_kernel, model_runner
from engine.kv_cache import BatchKVCache
from tests.helpers import (
    make_engine,
    mismatches,
    prompt_range,
    random_workload,
    run_workload,
    sixteen_prefilled,
)

pytestmark = pytest.mark.skipif(cpu_kernel.captured_llama() is None or cpu_kernel.decode_attention() is None,
                                reason="the captured step or the attention kernel does not build here")


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, default_model, default_model_bf16):
    return default_model if request.param == "float32" else default_model_bf16


def _cache(loaded, runner, kvs) -> BatchKVCache:
    s = runner.shape
    cache = BatchKVCache(s.num_layers, s.kv_heads, s.head_dim, loaded.dtype, loaded.device, row_capacity=len(kvs))
    for i, kv in enumerate(kvs):
        cache.insert(f"r{i}", kv)
    return cache


def _step(runner, cache, token: int, shift: int = 0) -> torch.Tensor:
    n = cache.rows
    return runner.batch_forward(cache, torch.full((n, 1), token), torch.tensor(cache.real)[:, None] + shift,
                                torch.ones(n, 1, dtype=torch.bool))


def test_a_captured_step_is_the_eager_forward_bit_for_bit(model) -> None:
    """16 rows of 16-250 cached tokens (left padding of every width), three steps in a row: the same logits and the
    same cache buffers (every layer's new key and value columns) as the eager forward, and a position off by one is
    seen (the comparison has teeth)."""
    captured = model_runner.ModelRunner(model.model, model.device)
    eager = model_runner.ModelRunner(model.model, model.device, captured_forward=False)
    assert captured.captured is not None and eager.captured is None
    kvs = sixteen_prefilled(model)
    a, b = _cache(model, captured, kvs), _cache(model, eager, kvs)
    for step in range(3):
        fast, slow = _step(captured, a, 1000 + step), _step(eager, b, 1000 + step)
        assert torch.equal(fast, slow), step
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), step
        a.check_invariants()
    assert not torch.equal(_step(captured, a, 7, shift=1), _step(eager, b, 7))


def test_decode_steps_take_the_prompts_lanes_copies_where_prompts_do(model) -> None:
    """Where prompts go through the AVX-512 kernel's lanes copies, the decode step's seven linears a layer and the
    output embedding take those same copies (the faster layout there, narrow_linear.lanes_decode_kernel), in the
    captured step and in the eager one, so the bit-for-bit comparison above covers them; elsewhere the weights as
    they are."""
    from engine.narrow_linear import lanes_decode_kernel, lanes_weight

    runner = model_runner.ModelRunner(model.model, model.device)
    assert runner.captured is not None
    lanes = runner.packs and not cpu_kernel.amx_in_use() and lanes_decode_kernel(model.dtype) is not None
    step = runner.captured
    linears = [w for i, w in enumerate(step.layer_weights) if i % 9 not in (0, 5)]
    if lanes:
        assert all(w.dim() == 4 for w in linears) and step.lm_head.dim() == 4
        assert step.lm_head is lanes_weight(model.model.lm_head.weight)  # the prompts' copy, not a second one
        assert step.max_rows >= 1 << 30
    else:
        assert all(w.dim() == 2 for w in linears) and step.lm_head.dim() == 2


def test_it_stands_aside_where_it_does_not_apply(model, tiny_model) -> None:
    """Prompts joining inside the batch forward (two new columns), more rows than the row kernel takes, a model it
    does not know, and `captured_forward: false` all run the eager forward."""
    runner = model_runner.ModelRunner(model.model, model.device)
    assert runner.captured is not None
    assert runner.captured.takes(1, 1) and not runner.captured.takes(1, 2)
    assert not runner.captured.takes(runner.captured.max_rows + 1, 1)
    assert model_runner.ModelRunner(tiny_model.model, tiny_model.device).captured is None
    assert "float64" in (captured.why_not(tiny_model.model) or "")
    assert model_runner.ModelRunner(model.model, model.device, captured_forward=False).captured is None
    assert model_runner.ModelRunner(model.model, model.device, attention_kernel=False).captured is None


def test_a_model_with_biases_is_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    config._attn_implementation = "baton"
    assert "biases" in (captured.why_not(LlamaForCausalLM(config).eval()) or "")


def test_an_engine_gives_the_same_tokens_captured_or_eager(model) -> None:
    """Requests joining and leaving one engine (batch sizes 1-12, prompts joining as decode goes on): the same
    tokens with the captured step as with the eager forward."""
    work = random_workload(seed=33, n=12, vocab=model.model.config.vocab_size, prompt_len=prompt_range(model, 16, 200),
                           max_tokens=(1, 10), arrival_span=8)
    captured = run_workload(make_engine(model, max_batch_size=12), work)
    eager = run_workload(make_engine(model, max_batch_size=12, captured_forward=False), work)
    assert mismatches(captured, eager) == []


def test_captured_prompts_are_the_eager_prefill_bit_for_bit(model) -> None:
    """Prompts of 1-256 tokens from scratch: KV and last logits `torch.equal` to the eager `prefill` of each alone, and
    (where prompts pack) to the eager packed prefill of all of them in one forward."""
    captured = model_runner.ModelRunner(model.model, model.device)
    eager = model_runner.ModelRunner(model.model, model.device, captured_forward=False)
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (1, 7, 40, 33, 256, 129)]
    alone = [eager.prefill(p) for p in prompts]
    assert captured.captured is not None
    groups = [prompts] if captured.captured.packs else [[p] for p in prompts]
    got = [r for g in groups for r in captured.captured.prefill(g)]
    for (kv, logits), (ref_kv, ref_logits) in zip(got, alone, strict=True):
        assert torch.equal(kv.keys, ref_kv.keys) and torch.equal(kv.values, ref_kv.values)
        assert torch.equal(logits, ref_logits)
    if eager.packs:
        packed = eager.prefill_packed(prompts)
        assert all(torch.equal(a[1], b[1]) and torch.equal(a[0].keys, b[0].keys) for a, b in zip(got, packed, strict=True))
    # teeth: one token changed changes that prompt's logits
    changed = captured.captured.prefill([prompts[2][:-1] + [prompts[2][-1] + 1]])[0][1]
    assert not torch.equal(changed, alone[2][1])


def test_an_engine_prefills_through_the_captured_forward(model) -> None:
    """The engine's prompts that fit one chunk go through the captured prefill (its forward count moves), and a burst
    of them gets the same tokens as the eager engine's."""
    work = random_workload(seed=34, n=10, vocab=model.model.config.vocab_size, prompt_len=prompt_range(model, 1, 250),
                           max_tokens=(1, 6), arrival_span=0)
    engine = make_engine(model, max_batch_size=10)
    calls = []
    real = engine.runner.captured.prefill
    engine.runner.captured = dataclasses.replace(engine.runner.captured)
    object.__setattr__(engine.runner.captured, "prefill", lambda prompts: calls.append(len(prompts)) or real(prompts))
    got = run_workload(engine, work)
    assert sum(calls) == len(work)
    assert mismatches(got, run_workload(make_engine(model, max_batch_size=10, captured_forward=False), work)) == []


def test_packed_prompts_do_not_depend_on_the_thread_count(model) -> None:
    """The runner runs prompts at the thread tuner's count where they pack (bfloat16 on AMX or AVX512-BF16, float32
    through a compiled kernel off Intel): their bits must not depend on it."""
    runner = model_runner.ModelRunner(model.model, model.device)
    if runner.captured is None or not runner.packs:
        pytest.skip(f"{model.dtype} prompts do not pack here (bfloat16 on AVX512-BF16, float32 off Intel with a compiled kernel)")
    gen = torch.Generator().manual_seed(12)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (5, 64, 200, 31)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = runner.captured.prefill(prompts)
        torch.set_num_threads(1)
        one = runner.captured.prefill(prompts)
    finally:
        torch.set_num_threads(before)
    for (a, la), (b, lb) in zip(two, one, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(la, lb)


def test_the_fused_loops_sum_in_atens_order() -> None:
    """RMSNorm's mean is the one order-dependent step of the fused decode loops: its emulated sum must be
    `torch.sum`'s bits for the vector width the runner picks, on row widths with a scalar tail, leftover vectors and
    one or more cascade levels; other widths must give other bits somewhere (the check that picks it has teeth)."""
    lanes = captured.sum_lanes()
    assert lanes in (4, 8, 16), "no emulated order matches torch.sum here"
    gen = torch.Generator().manual_seed(5)
    for width in (3, 8, 100, 576, 577, 1000, 4096, 70001):
        rows = (torch.randn(16, width, generator=gen) * torch.rand(16, 1, generator=gen) * 8).pow(2)
        assert torch.equal(torch.ops.baton_captured.row_sum(rows, lanes), rows.sum(-1)), width
    wide = (torch.randn(64, 4096, generator=gen) * 4).pow(2)
    for other in {4, 8, 16} - {lanes}:
        assert not torch.equal(torch.ops.baton_captured.row_sum(wide, other), wide.sum(-1)), other


def test_the_fused_decode_step_is_the_aten_one_bit_for_bit(model) -> None:
    """The runner's captured step fuses the norms, rotary, residuals and cache writes (`fused_lanes` > 0 here), and
    its logits and cache buffers equal the same step made of ATen calls (`fused_lanes` 0) over three steps of 16 rows
    with left padding of every width; with the wrong sum order (another vector width) float32 logits differ: the
    comparison sees a one-ulp change in one norm's mean."""
    fused = model_runner.ModelRunner(model.model, model.device)
    assert fused.captured is not None and fused.captured.fused_lanes > 0
    aten = model_runner.ModelRunner(model.model, model.device)
    aten.captured = dataclasses.replace(fused.captured, fused_lanes=0)
    kvs = sixteen_prefilled(model)
    a, b = _cache(model, fused, kvs), _cache(model, aten, kvs)
    for step in range(3):
        assert torch.equal(_step(fused, a, 500 + step), _step(aten, b, 500 + step)), step
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), step
    if model.dtype is torch.float32:
        wrong = model_runner.ModelRunner(model.model, model.device)
        wrong.captured = dataclasses.replace(fused.captured, fused_lanes=16 if fused.captured.fused_lanes != 16 else 4)
        c = _cache(model, wrong, kvs)
        assert not torch.equal(_step(wrong, c, 500), _step(fused, _cache(model, fused, kvs), 500))


def test_fusing_stands_aside_where_atens_sum_order_is_unknown(model, monkeypatch) -> None:
    """Where no emulated order matches `torch.sum` (another torch, another CPU), the step keeps ATen's calls."""
    monkeypatch.setattr(captured, "sum_lanes", lambda: 0)
    runner = model_runner.ModelRunner(model.model, model.device)
    assert runner.captured is not None and runner.captured.fused_lanes == 0

"""Batch invariance (docs/architecture.md, "Batch invariance"): a request's greedy tokens equal the engine's own
run of that request alone, whatever shares its batch, in float32 and in bfloat16.

From the kernels up: the decode batch's linears give a row the same bits in any batch of up to 16 rows; SDPA
gives a row the same bits under left padding that keeps the attention window aligned (`attention_width`), and
different bits without it; one decode step of the default model gives a row the same logits alone and in a
batch of 16; and 16 requests that join and leave one engine get their solo tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine import cpu_kernel, kv_cache, model_runner
from engine.kv_cache import BatchKVCache, attention_width
from engine.narrow_linear import MAX_ROWS, lanes_decode_kernel, resolve_kernel
from tests.helpers import (
    SIXTEEN_LENGTHS,
    make_engine,
    mismatches,
    prompt_range,
    random_workload,
    run_workload,
    sixteen_prefilled,
)

DTYPES = [torch.float32, torch.bfloat16]
# The default model's linear shapes (out, in): q/o, k/v, gate/up, down, the LM head.
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, default_model, default_model_bf16):
    return default_model if request.param == "float32" else default_model_bf16


@pytest.mark.parametrize("lanes", [False, True], ids=["as-is", "lanes-copies"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_linears_give_a_row_the_same_bits_in_any_batch(dtype: torch.dtype, lanes: bool) -> None:
    """The row kernel `resolve_kernel` gives (up to 16 rows), and where prompts take the AVX-512 kernel's lanes copies
    the decode kernel over those copies (`lanes_decode_kernel`, up to 40 rows here: it has no row limit)."""
    kernel = lanes_decode_kernel(dtype) if lanes else resolve_kernel("auto")[1]
    if kernel is None:
        pytest.skip("the decode batch does not take the lanes copies here")
    most = 40 if lanes else MAX_ROWS

    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # what NarrowLinear runs in a decode step
        out = kernel(x, w, None)
        return out if out is not None else F.linear(x, w)

    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in SHAPES:
        w = (torch.randn(out_f, in_f, generator=gen) * in_f**-0.5).to(dtype)
        x = torch.randn(most, in_f, generator=gen).to(dtype)
        alone = torch.cat([linear(x[r : r + 1], w) for r in range(most)])
        for rows in (*range(2, 17), 24, 33, 40) if lanes else range(2, MAX_ROWS + 1):
            assert torch.equal(linear(x[:rows], w), alone[:rows]), (dtype, (out_f, in_f), rows)


def _decode_attention(n: int, width: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """SDPA as transformers calls it in a decode step (3 query heads per KV head packed as queries), for one
    row of `n` real columns left-padded to `width` (masked zero columns)."""
    q = torch.randn(1, 3, 3, 64, generator=gen).to(dtype)
    k, v = (torch.randn(1, 3, n, 64, generator=gen).to(dtype) for _ in range(2))
    pad = torch.zeros(1, 3, width - n, 64, dtype=dtype)
    mask = torch.zeros(1, 1, 1, width, dtype=torch.bool)
    mask[..., width - n :] = True
    return F.scaled_dot_product_attention(q, torch.cat([pad, k], 2), torch.cat([pad, v], 2), attn_mask=mask,
                                          scale=0.125)


# float32 attention is bit-identical only while the window stays within 384 columns: above that the float32
# GEMM inside SDPA's kernel splits its reduction by the window's width (measured: benchmarks/NOTES.md, "bf16
# batch invariance"), which no alignment can follow. bfloat16 holds at every width measured.
BIT_IDENTICAL_UP_TO = {torch.float32: 384, torch.bfloat16: 1100}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sdpa_is_bit_identical_under_aligned_left_padding(dtype: torch.dtype) -> None:
    """The kernel property the cache's alignment relies on (engine/kv_cache.py, ATTENTION_ALIGN): if a torch
    upgrade changes how SDPA's CPU kernel blocks its columns, this fails first."""
    unaligned_differs = 0
    for n in (17, 41, 100, 250, 300, 600):
        seed = 1000 + n
        alone = _decode_attention(n, attention_width(n), dtype, torch.Generator().manual_seed(seed))
        for batch_width in (n + 23, n + 100, 320, 400, 511, 700, 1100):
            if not n <= batch_width <= BIT_IDENTICAL_UP_TO[dtype]:
                continue
            padded = _decode_attention(n, attention_width(batch_width), dtype, torch.Generator().manual_seed(seed))
            assert torch.equal(padded, alone), (dtype, n, batch_width)
            raw = _decode_attention(n, batch_width, dtype, torch.Generator().manual_seed(seed))
            unaligned_differs += not torch.equal(raw, alone)
    assert unaligned_differs > 0, "unaligned padding never changed a bit: the test would not notice a regression"


def _one_step_logits(loaded, kvs, order: list[int], attention_kernel: bool = True) -> torch.Tensor:
    runner = model_runner.ModelRunner(loaded.model, loaded.device, attention_kernel=attention_kernel)
    s = runner.shape
    cache = BatchKVCache(s.num_layers, s.kv_heads, s.head_dim, loaded.dtype, loaded.device, row_capacity=len(order))
    for i in order:
        cache.insert(f"r{i}", kvs[i])
    n = len(order)
    logits = runner.batch_forward(cache, torch.full((n, 1), 1000), torch.tensor(cache.real)[:, None],
                                  torch.ones(n, 1, dtype=torch.bool))
    cache.check_invariants()
    return logits[0]


@pytest.mark.parametrize("attention", ["kernel", "sdpa"])
def test_one_decode_step_gives_a_row_the_same_logits_alone_and_in_a_batch(model, monkeypatch, attention) -> None:
    """With either attention (engine/decode_attention.py's kernel, or SDPA over the aligned window)."""
    kernel = attention == "kernel"
    if kernel and cpu_kernel.decode_attention() is None:
        pytest.skip(f"the attention kernel does not run here: {cpu_kernel.why_not_attention()}")
    kvs = sixteen_prefilled(model)
    lengths = SIXTEEN_LENGTHS
    differ = []
    for target in (0, 2, 5):
        others = [i for i in range(len(lengths)) if i != target]
        alone = _one_step_logits(model, kvs, [target], kernel)
        differ += [rows for rows in (2, 8, 16)
                   if not torch.equal(_one_step_logits(model, kvs, [target, *others[: rows - 1]], kernel), alone)]
    assert differ == []
    # With the window unaligned (attention sees exactly the live window), SDPA's bits move with the padding: the
    # alignment is what keeps them. The kernel reads only a row's real columns, so padding cannot move them.
    monkeypatch.setattr(kv_cache, "attention_width", lambda width: width)
    monkeypatch.setattr(model_runner, "attention_width", lambda width: width)
    alone = _one_step_logits(model, kvs, [2], kernel)
    batched = _one_step_logits(model, kvs, [2, *(i for i in range(len(lengths)) if i != 2)], kernel)
    assert torch.equal(batched, alone) is kernel


def test_sixteen_requests_get_their_solo_tokens(model) -> None:
    """16 requests (prompts 16-256 token ids, 1-12 new tokens, greedy, EOS ignored) arrive over 16 iterations
    into one engine, joining and leaving; each gets exactly the tokens the engine gives it alone."""
    work = random_workload(seed=21, n=16, vocab=model.model.config.vocab_size, prompt_len=prompt_range(model, 16, 256),
                           max_tokens=(1, 12), arrival_span=16)
    together = run_workload(make_engine(model, max_batch_size=16), work,
                            check=lambda engine: engine.cache.check_invariants())
    alone = {}
    for w in work:
        alone.update(run_workload(make_engine(model, max_batch_size=16), [{**w, "arrival": 0}]))
    assert mismatches(together, alone) == []

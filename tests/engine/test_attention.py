"""The engine's attention function (engine/attention.py): the decode batch's kernel and packed prompts.

The kernel (engine/kernels/decode_attention.cpp) against the attention formula in float64, a row's bits alone and
in any batch under any left padding, the mask obeyed column by column; packed prompts bit-identical to their solo
prefills (KV and logits) on the default model in bfloat16 with AMX, and the engine's tokens with packing equal its
solo runs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from engine import attention, cpu_kernel, model_runner, narrow_linear
from engine.model_runner import ModelRunner
from tests.helpers import make_engine, mismatches, random_workload, run_workload

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def kernel():
    k = cpu_kernel.decode_attention()
    if k is None:
        pytest.skip(f"the attention kernel does not run here: {cpu_kernel.why_not_attention()}")
    return k


def _inputs(rows: int, heads: int, kv_heads: int, width: int, t: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, t, heads, 64, generator=g).to(dtype).transpose(1, 2)  # strided, as transformers passes it
    k = torch.randn(rows, kv_heads, width + 7, 64, generator=g).to(dtype)[:, :, 7:]  # a window into a wider buffer
    v = torch.randn(rows, kv_heads, width + 7, 64, generator=g).to(dtype)[:, :, 7:]
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    real = torch.arange(width)[None, :] >= (width - lengths)[:, None]  # left-padded rows
    causal = torch.arange(width)[None, :] <= (width - t + torch.arange(t))[:, None]  # [t, width]
    return q, k, v, real[:, None, :] & causal[None]  # mask [rows, t, width]


def _reference(q, k, v, mask, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)  # [rows, t, heads, D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "t"), [(9, 3, 1), (4, 4, 1), (8, 2, 5)])
def test_the_kernel_is_attention_over_the_masked_columns(kernel, dtype, heads, kv_heads, t) -> None:
    """Grouped heads or not, one query per row or several (a prompt joining inside the batch, causal)."""
    q, k, v, mask = _inputs(6, heads, kv_heads, 200, t, dtype, seed=heads + t)
    got = kernel(q, k, v, mask, 0.125)
    assert got.shape == (6, t, heads, 64) and got.dtype is dtype
    tol = 1e-5 if dtype is torch.float32 else 2e-2
    assert (got.double() - _reference(q, k, v, mask, 0.125)).abs().max().item() < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_kernel_gives_a_row_the_same_bits_alone_and_in_any_batch(kernel, dtype) -> None:
    """A row alone in a window just wide enough for it, and in batches whose windows are wider by any padding,
    aligned or not (SDPA keeps its bits only under aligned padding, and in float32 only up to 384 columns)."""
    q, k, v, mask = _inputs(8, 9, 3, 700, 1, dtype, seed=3)
    full = kernel(q, k, v, mask, 0.125)
    for r in range(8):
        n = int(mask[r, 0].sum())
        alone = kernel(q[r:r + 1], k[r:r + 1, :, -n:], v[r:r + 1, :, -n:], mask[r:r + 1, :, -n:], 0.125)
        assert torch.equal(alone, full[r:r + 1]), r
        for extra in (1, 13, 100):  # the row with more padding on its left, beside the others
            w = min(700, n + extra)
            part = kernel(q[: r + 1], k[: r + 1, :, -w:], v[: r + 1, :, -w:], mask[: r + 1, :, -w:] | False, 0.125)
            if bool(mask[: r + 1, :, :-w].any()):  # a neighbour lost columns: only row r is compared
                part = part[r:]
            assert torch.equal(part[-1:], full[r:r + 1]), (r, extra)


def test_the_kernel_obeys_the_mask_column_by_column(kernel) -> None:
    """Teeth: unmasking one padded column, or masking one real one, changes that row's result and no other's."""
    q, k, v, mask = _inputs(4, 9, 3, 120, 1, torch.float32, seed=5)
    base = kernel(q, k, v, mask, 0.125)
    for r in range(4):
        for flip in (int((~mask[r, 0]).nonzero()[0]) if bool((~mask[r, 0]).any()) else None, 119):
            if flip is None:
                continue
            changed = mask.clone()
            changed[r, 0, flip] = not bool(changed[r, 0, flip])
            if not bool(changed[r, 0].any()):
                continue
            got = kernel(q, k, v, changed, 0.125)
            assert not torch.equal(got[r], base[r]), (r, flip)
            others = [i for i in range(4) if i != r]
            assert torch.equal(got[others], base[others])


def test_outside_an_engine_forward_the_function_is_sdpa(default_model_bf16) -> None:
    """The registered function with no mode set is transformers' SDPA forward, bit for bit: `generate` and
    prefills are unchanged by the install."""
    model = default_model_bf16.model
    attention.EngineAttention.install(model)
    module = model.model.layers[0].self_attn
    q, k, v, mask = _inputs(3, 9, 3, 64, 1, torch.bfloat16, seed=7)
    ours = attention._attention(module, q, k, v, mask[:, None], scaling=0.125)[0]
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    assert torch.equal(ours, sdpa_attention_forward(module, q, k, v, mask[:, None], scaling=0.125)[0])


@pytest.fixture(scope="module")
def packing_runner(default_model_bf16) -> ModelRunner:
    """bfloat16 prompts packed through the AMX kernel (its packed weights)."""
    runner = ModelRunner(default_model_bf16.model, default_model_bf16.device)
    if not (runner.packs and cpu_kernel.amx_in_use()):
        pytest.skip("no AMX here: bfloat16 prompts are packed through the AVX-512 kernel's lanes, no tile copies")
    return runner


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def packing_model(request, default_model, default_model_bf16):
    """The default model in a dtype whose prompts pack here: bfloat16 on AMX or through the AVX-512 kernel's lanes
    without it, float32 through those lanes on CPUs other than Intel's (narrow_linear.lanes_prompt_kernel)."""
    loaded = default_model if request.param == "float32" else default_model_bf16
    if not ModelRunner(loaded.model, loaded.device).packs:
        pytest.skip(f"{request.param} prompts do not pack on this CPU")
    return loaded


def test_the_layers_weights_are_packed_at_load_and_the_output_embedding_is_not(packing_runner) -> None:
    """Packed at load (no first-prompt stall): every layer linear's weight has its tile copy, as large as it; the
    output embedding is not counted (packed only if prompts ever reach it with more than 32 rows)."""
    model = packing_runner.model
    linears = [m for m in model.model.modules() if type(m) is torch.nn.Linear]
    assert linears and all(getattr(m.weight, narrow_linear._PACKED, None) is not None for m in linears)
    assert all(getattr(m.weight, narrow_linear._PACKED).nbytes == m.weight.nbytes for m in linears)
    assert model_runner.pack_layer_weights(model) == sum(m.weight.nbytes for m in linears)


def test_packed_prefill_off_keeps_one_prompt_per_forward_and_32_decode_rows(default_model_bf16, packing_runner
                                                                         ) -> None:
    """`packed_prefill: false`: no packing, prompts through F.linear, bfloat16 decode rows on AMX up to 32 (no
    packed weights needed)."""
    runner = ModelRunner(default_model_bf16.model, default_model_bf16.device, packed_prefill=False)
    assert not runner.packs and runner._prompt_kernel is None
    w = torch.randn(64, 64).bfloat16()
    assert runner._row_kernel is not None
    assert runner._row_kernel(torch.randn(32, 64).bfloat16(), w, None) is not None
    assert runner._row_kernel(torch.randn(33, 64).bfloat16(), w, None) is None
    assert packing_runner._row_kernel is not None and packing_runner._row_kernel(torch.randn(33, 64).bfloat16(), w, None) is not None


def test_a_model_whose_weights_do_not_fit_the_tiles_is_not_packed(packing_runner) -> None:
    """A layer width off the AMX tiles (48 = 3 x 16, not a multiple of 32) would leave that linear to F.linear,
    whose bits depend on the row count: such a model prefills one prompt per forward, and nothing is packed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                         num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                                         attn_implementation="sdpa")).bfloat16().eval()
    runner = ModelRunner(model, torch.device("cpu"))
    assert not runner.packs and runner._prompt_kernel is None
    assert all(getattr(w, narrow_linear._PACKED, None) is None for w in model_runner.layer_linear_weights(model))


def test_packed_prompts_get_their_solo_prefill_bits(packing_model, monkeypatch) -> None:
    """16 prompts of 16-256 tokens in one forward: each one's KV and last logits equal its prefill alone."""
    packing_runner = ModelRunner(packing_model.model, packing_model.device)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(100, 40000, (n,), generator=g).tolist()
               for n in (40, 200, 17, 120, 90, 33, 256, 60, 16, 180, 75, 140, 25, 220, 100, 1)]
    solo = [packing_runner.prefill(p) for p in prompts]
    packed = packing_runner.prefill_packed(prompts)
    for i, ((kv, logits), (pkv, plogits)) in enumerate(zip(solo, packed, strict=True)):
        assert torch.equal(kv.keys, pkv.keys) and torch.equal(kv.values, pkv.values), i
        assert torch.equal(logits, plogits), i
    # Teeth: with attention across the prompts (one segment for all), the later prompts' logits change.
    segments = attention.EngineAttention.packed
    monkeypatch.setattr(attention.EngineAttention, "packed", staticmethod(lambda lengths: segments([sum(lengths)])))
    mixed = packing_runner.prefill_packed(prompts[:3])
    assert not torch.equal(mixed[1][1], solo[1][1]) and not torch.equal(mixed[2][1], solo[2][1])


def test_the_engine_packs_prompts_and_keeps_every_request_solo_exact(packing_model, monkeypatch) -> None:
    """12 requests at once (baton-pd): their prompts are prefilled in packed forwards, and every request's tokens
    equal the engine's run of it alone."""
    packs = _count_packs(monkeypatch)
    work = random_workload(seed=4, n=12, vocab=packing_model.model.config.vocab_size, prompt_len=(16, 200),
                           max_tokens=(1, 10), arrival_span=0)
    together = run_workload(make_engine(packing_model, max_batch_size=12), work)
    assert packs and max(packs) >= 2
    alone = {}
    for w in work:
        alone.update(run_workload(make_engine(packing_model, max_batch_size=12), [w]))
    assert mismatches(together, alone) == []


def _count_packs(monkeypatch) -> list[int]:
    """The prompt counts of every prefill forward from scratch, eager (`prefill_packed`) or captured
    (engine/captured.py), from now on."""
    from engine.captured import CapturedLlama

    packs: list[int] = []
    eager, captured = ModelRunner.prefill_packed, CapturedLlama.prefill
    monkeypatch.setattr(ModelRunner, "prefill_packed", lambda self, prompts: packs.append(len(prompts))
                        or eager(self, prompts))
    monkeypatch.setattr(CapturedLlama, "prefill", lambda self, prompts: packs.append(len(prompts))
                        or captured(self, prompts))
    return packs


def _run(engine, requests: dict[str, tuple[list[int], Any, int]]) -> dict[str, list[int]]:
    """Submit every request (prompt, params, n) at once and step until done; tokens per `id#choice`."""
    for rid, (prompt, params, n) in requests.items():
        for req in engine.make_choices(rid, prompt_token_ids=prompt, sampling_params=params, n=n):
            engine.enqueue(req)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            assert o.error is None, (o.request_id, o.error)
            tokens.setdefault(f"{o.request_id}#{o.index}", []).extend(o.new_token_ids)
    return tokens


def test_a_burst_of_mixed_requests_packs_and_each_gets_its_solo_output(packing_model, monkeypatch) -> None:
    """What a server's burst holds, at once: 1-token prompts, a prompt longer than a prefill chunk (chunked, not
    packed), one asking for prompt logprobs (prefilled alone), two choices of one prompt (prefilled once),
    seeded sampling, a one-token answer. The short prompts are packed; every choice's tokens equal the engine's
    run of its request alone."""
    from engine import SamplingParams

    packs = _count_packs(monkeypatch)
    g = torch.Generator().manual_seed(9)

    def ids(n: int) -> list[int]:
        return torch.randint(100, 40000, (n,), generator=g).tolist()

    greedy = SamplingParams(max_tokens=6, ignore_eos=True)
    requests = {
        "one-token": (ids(1), greedy, 1),
        "short": (ids(12), greedy, 1),
        "long": (ids(600), greedy, 1),
        "logprobs": (ids(40), SamplingParams(max_tokens=4, ignore_eos=True, prompt_logprobs=2), 1),
        "choices": (ids(70), SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.8, seed=3), 2),
        "seeded": (ids(33), SamplingParams(max_tokens=5, ignore_eos=True, temperature=1.0, top_p=0.9, seed=11), 1),
        "single": (ids(90), SamplingParams(max_tokens=1, ignore_eos=True), 1),
        "mid": (ids(200), greedy, 1),
    }
    together = _run(make_engine(packing_model, max_batch_size=8), requests)
    assert sum(n for n in packs if n >= 2) >= 4  # prompts that went through packed forwards
    alone: dict[str, list[int]] = {}
    for rid, req in requests.items():
        alone.update(_run(make_engine(packing_model, max_batch_size=8), {rid: req}))
    assert together == alone


def test_as_sdpa_names_sdpa_for_code_that_knows_no_other_and_restores(default_model_bf16) -> None:
    """transformers' continuous batching refuses an implementation it does not know (benchmarks/systems.py)."""
    model = default_model_bf16.model
    attention.EngineAttention.install(model)
    assert model.config._attn_implementation == attention.NAME
    with attention.as_sdpa(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == attention.NAME
    with pytest.raises(RuntimeError), attention.as_sdpa(model):
        raise RuntimeError("a failing run")
    assert model.config._attn_implementation == attention.NAME

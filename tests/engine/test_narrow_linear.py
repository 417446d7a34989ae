"""The CPU narrow-linear kernel: the same product as F.linear, used only inside the engine's decode step."""

from __future__ import annotations

import torch

from engine.narrow_linear import MAX_ROWS, NarrowLinear, narrow_linear
from tests.helpers import make_engine, mismatches, random_workload, run_workload, solo_greedy


def test_narrow_linear_is_f_linear_up_to_summation_order() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(300, 64, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    for shape in [(2, 64), (5, 1, 64), (4, 4, 64), (MAX_ROWS, 64)]:
        x = torch.randn(*shape, dtype=torch.float64)
        for bias in (None, b):
            got = narrow_linear(x, w, bias, max_rows=MAX_ROWS)
            assert got is not None and got.is_contiguous()
            assert torch.allclose(got, torch.nn.functional.linear(x, w, bias), rtol=1e-12, atol=1e-12)
    # Where it does not apply, the caller runs F.linear: one row, too many rows, mixed dtypes.
    assert narrow_linear(torch.randn(1, 64, dtype=torch.float64), w) is None
    assert narrow_linear(torch.randn(MAX_ROWS + 1, 64, dtype=torch.float64), w, max_rows=MAX_ROWS) is None
    assert narrow_linear(torch.randn(3, 64), w) is None


def test_installed_forward_is_f_linear_outside_the_engine_step(tiny_model) -> None:
    model = tiny_model.model
    narrow = NarrowLinear.install(model)
    assert NarrowLinear.install(model) is narrow  # one switch per model, shared by its engines
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears and all("forward" in m.__dict__ for m in linears)
    x = torch.randn(4, 64, dtype=torch.float64)
    q = model.model.layers[0].self_attn.q_proj
    calls: list[int] = []
    original = torch.mm

    def counting_mm(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return original(*args, **kwargs)

    torch.mm = counting_mm  # type: ignore[assignment]
    try:
        outside = q(x)
        assert calls == []  # not active: plain F.linear
        with narrow.active():
            inside = q(x)
        assert calls == [1]  # active: the narrow kernel ran
    finally:
        torch.mm = original  # type: ignore[assignment]
    assert torch.allclose(inside, outside, rtol=1e-12, atol=1e-12)


def test_engine_with_and_without_it_is_token_identical_to_solo_generate(tiny_model) -> None:
    work = random_workload(seed=3, n=12, vocab=tiny_model.model.config.vocab_size, prompt_len=(1, 40),
                           max_tokens=(1, 20), arrival_span=10)
    reference = {w["id"]: solo_greedy(tiny_model.model, w["prompt"], w["max_tokens"]) for w in work}
    for on in (True, False):
        engine = make_engine(tiny_model, policy="baton-pd", max_batch_size=6, narrow_linear=on)
        assert (engine.runner.narrow is not None) == on
        assert mismatches(run_workload(engine, work), reference) == []

"""The CPU kernels for a decode batch's linear layers: the same product as F.linear, used only inside the
engine's decode step; the compiled one gives each row a result that does not depend on its batch."""

from __future__ import annotations

import pytest
import torch

from engine import cpu_kernel
from engine.narrow_linear import MAX_ROWS, NarrowLinear, compiled_linear, resolve_kernel, transposed_linear
from tests.helpers import make_engine, mismatches, random_workload, run_workload, solo_greedy


def test_transposed_linear_is_f_linear_up_to_summation_order() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(300, 64, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    for shape in [(2, 64), (5, 1, 64), (4, 4, 64), (MAX_ROWS, 64)]:
        x = torch.randn(*shape, dtype=torch.float64)
        for bias in (None, b):
            got = transposed_linear(x, w, bias, max_rows=MAX_ROWS)
            assert got is not None and got.is_contiguous()
            assert torch.allclose(got, torch.nn.functional.linear(x, w, bias), rtol=1e-12, atol=1e-12)
    # Where it does not apply, the caller runs F.linear: one row, too many rows, mixed dtypes.
    assert transposed_linear(torch.randn(1, 64, dtype=torch.float64), w) is None
    assert transposed_linear(torch.randn(MAX_ROWS + 1, 64, dtype=torch.float64), w, max_rows=MAX_ROWS) is None
    assert transposed_linear(torch.randn(3, 64), w) is None


def test_compiled_linear_declines_what_it_does_not_cover(kernel) -> None:
    w = torch.randn(8, 16)
    assert compiled_linear(kernel, torch.randn(MAX_ROWS + 1, 16), w) is None  # a prompt: F.linear
    assert compiled_linear(kernel, torch.randn(2, 16, dtype=torch.float64), w.double()) is None
    assert compiled_linear(kernel, torch.randn(2, 16), torch.randn(16, 8).t()) is None  # non-contiguous weight
    with pytest.raises(RuntimeError, match="float32"):
        kernel(torch.randn(2, 16, dtype=torch.float64), w.double())


def test_resolve_kernel_by_name(monkeypatch) -> None:
    assert resolve_kernel("transposed")[0] == "transposed"
    with pytest.raises(ValueError, match="narrow_kernel"):
        resolve_kernel("fastest")  # type: ignore[arg-type]
    monkeypatch.setitem(cpu_kernel._loaded, cpu_kernel.NAME, None)
    monkeypatch.setattr(cpu_kernel, "_why_not", ["no compiler here"])
    assert resolve_kernel("auto")[0] == "transposed"  # auto falls back
    with pytest.raises(ValueError, match="no compiler here"):
        resolve_kernel("compiled")  # asked for by name: a clear error, not a silent fallback


def test_installed_forward_is_f_linear_outside_the_engine_step(tiny_model) -> None:
    model = tiny_model.model
    narrow = NarrowLinear.install(model)
    assert NarrowLinear.install(model) is narrow  # one switch per model, shared by its engines
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert linears and all("forward" in m.__dict__ for m in linears)
    x = torch.randn(4, 64, dtype=torch.float64)
    q = model.model.layers[0].self_attn.q_proj
    calls: list[tuple[int, ...]] = []

    def recording(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor | None:
        calls.append(tuple(x.shape))
        return transposed_linear(x, w, b)

    outside = q(x)
    assert calls == []  # not active: plain F.linear
    with narrow.active(recording):
        inside = q(x)
    assert calls == [(4, 64)]  # active: the engine's kernel ran
    assert q(x).shape == outside.shape and calls == [(4, 64)]  # and is off again after the block
    assert torch.allclose(inside, outside, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel_name", ["compiled", "transposed"])
def test_engine_with_each_kernel_is_token_identical_to_solo_generate(default_model, kernel_name) -> None:
    """float32 (the compiled kernel's dtype), the real model: every decode step's linears go through the kernel."""
    if kernel_name == "compiled" and cpu_kernel.skinny_linear() is None:
        pytest.skip(f"compiled kernel unavailable: {cpu_kernel.why_not()}")
    work = random_workload(seed=11, n=8, vocab=default_model.model.config.vocab_size, prompt_len=(1, 60),
                           max_tokens=(1, 24), arrival_span=8)
    reference = {w["id"]: solo_greedy(default_model.model, w["prompt"], w["max_tokens"]) for w in work}
    engine = make_engine(default_model, policy="baton-pd", max_batch_size=6, narrow_kernel=kernel_name)
    assert engine.runner.narrow_kernel == kernel_name
    assert mismatches(run_workload(engine, work), reference) == []


def test_engine_without_it_uses_f_linear(tiny_model) -> None:
    work = random_workload(seed=3, n=12, vocab=tiny_model.model.config.vocab_size, prompt_len=(1, 40),
                           max_tokens=(1, 20), arrival_span=10)
    reference = {w["id"]: solo_greedy(tiny_model.model, w["prompt"], w["max_tokens"]) for w in work}
    engine = make_engine(tiny_model, policy="baton-pd", max_batch_size=6, narrow_linear=False)
    assert engine.runner.narrow is None and engine.runner.narrow_kernel == "off"
    assert mismatches(run_workload(engine, work), reference) == []

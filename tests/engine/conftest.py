"""Fixtures shared by the engine tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine import cpu_kernel


@pytest.fixture(scope="session")
def kernel() -> cpu_kernel.Kernel:
    """The compiled CPU decode kernel; tests that need it skip where it cannot run (they say why)."""
    compiled = cpu_kernel.skinny_linear()
    if compiled is None:
        pytest.skip(f"compiled kernel unavailable: {cpu_kernel.why_not()}")
    return compiled


@pytest.fixture(scope="session")
def kernel_bf16() -> cpu_kernel.Kernel:
    """The AVX-512 decode kernel (CPUs with AVX512-BF16; bfloat16 and float32); tests that need it skip
    elsewhere."""
    compiled = cpu_kernel.skinny_linear_avx512()
    if compiled is None:
        pytest.skip(f"AVX-512 kernel unavailable: {cpu_kernel.why_not_avx512()}")
    return compiled


@pytest.fixture(params=["avx2", "avx512"])
def kernel_f32(request) -> cpu_kernel.Kernel:
    """Each compiled float32 kernel in turn: the AVX2 one, then the AVX-512 one where this CPU has it."""
    return request.getfixturevalue("kernel" if request.param == "avx2" else "kernel_bf16")


@pytest.fixture(params=["amx", "avx512"])
def bf16_path(request, kernel_bf16):
    """Each path of the bfloat16 kernel in turn (AMX where this CPU has it, then vdpbf16ps); the process's
    choice is restored afterwards."""
    before = cpu_kernel.amx_in_use()
    if request.param == "amx" and not cpu_kernel.use_amx(True):
        cpu_kernel.use_amx(before)
        pytest.skip("no AMX-BF16 on this CPU (or the OS refused the tile state)")
    if request.param == "avx512":
        cpu_kernel.use_amx(False)
    yield request.param
    cpu_kernel.use_amx(before)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module's tests (`pytestmark = pytest.mark.usefixtures("one_thread")`): the
    machine is shared, and their runs are small."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest

from engine import cpu_kernel


@pytest.fixture(scope="session")
def kernel() -> cpu_kernel.Kernel:
    """The compiled CPU decode kernel; tests that need it skip where it cannot run (they say why)."""
    compiled = cpu_kernel.skinny_linear()
    if compiled is None:
        pytest.skip(f"compiled kernel unavailable: {cpu_kernel.why_not()}")
    return compiled

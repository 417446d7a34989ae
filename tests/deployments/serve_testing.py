"""Helpers for the Serve tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import pytest

from benchmarks.serve_local import free_port  # noqa: F401  (re-exported: one loopback port helper)
from tests.deployments.fake_engine import FakeAsyncEngine


def wait_until(
    predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1, what: str = ""
) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what or predicate} (last value: {last!r})")


def fake_factory(**kwargs: Any) -> Callable[..., FakeAsyncEngine]:
    """A picklable front factory for `make_app(front_factory=...)`: the fake engine with these options."""
    return functools.partial(FakeAsyncEngine, **kwargs)

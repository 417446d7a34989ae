"""Helpers for the Serve tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.deployments.fake_engine import FakeAsyncEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

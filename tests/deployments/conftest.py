"""Shared fixtures for the Serve tests: the session's local Ray instance + Serve on loopback (`ray_serve`, in
tests/conftest.py, also used by tests/benchmarks), shared by the modules (each module deploys its own
applications, deleted after it).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from configs import EngineConfig
from tests.deployments.fake_engine import FakeAsyncEngine
from tests.deployments.serve_testing import wait_until


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ray_cluster: starts Ray/Serve CLI subprocesses (`serve run`, `ray start --head`)"
    )


@pytest.fixture(scope="module")
def serve_instance(ray_serve: str) -> Iterator[str]:
    """The shared Serve instance for one module; the module's applications are deleted after it."""
    from ray import serve

    yield ray_serve
    names = list(serve.status().applications)
    for name in names:
        serve.delete(name, _blocking=False)  # all at once: each waits out its graceful shutdown
    wait_until(lambda: not serve.status().applications, timeout_s=60, what=f"deleting {names}")


@pytest.fixture
def front() -> Iterator[FakeAsyncEngine]:
    """A started fake engine front (2 rows, 512-token context) for the in-process serving tests."""
    f = FakeAsyncEngine(EngineConfig(model="fake", max_batch_size=2, max_model_len=512), step_delay_s=0.002)
    f.start()
    yield f
    f.shutdown()

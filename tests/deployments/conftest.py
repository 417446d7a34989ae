"""Shared fixtures for the Serve tests: one local Ray instance + Serve on loopback, shared by the modules
(each module deploys its own applications, deleted after it).

Ray workers get the repository root on PYTHONPATH so an injected fake front
(`tests.deployments.fake_engine.FakeAsyncEngine`) can be unpickled on the replicas.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deployments.serve_testing import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ray_cluster: starts Ray/Serve CLI subprocesses (`serve run`, `ray start --head`)"
    )


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Where this session's Ray exports Prometheus metrics."""
    return free_port()


@pytest.fixture(scope="session")
def ray_serve(metrics_port: int) -> Iterator[str]:
    """One local Ray instance (CPU only, no dashboard) with Serve on a free loopback port, for the whole
    session: starting Ray costs ~15 s on 2 cores, so the modules share it. Yields the HTTP base URL."""
    import ray
    from ray import serve

    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    port = free_port()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        logging_level="WARNING",
        log_to_driver=bool(os.environ.get("BATON_TEST_RAY_LOGS")),
        _metrics_export_port=metrics_port,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def serve_instance(ray_serve: str) -> Iterator[str]:
    """The shared Serve instance for one module; the module's applications are deleted after it."""
    from ray import serve

    yield ray_serve
    names = list(serve.status().applications)
    for name in names:
        serve.delete(name, _blocking=False)  # all at once: each waits out its graceful shutdown
    wait_until(lambda: not serve.status().applications, timeout_s=60, what=f"deleting {names}")

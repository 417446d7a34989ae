"""A local Ray + Serve on loopback, for the HTTP benchmarks and the test suite (one place that starts it)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_instance(base_url: str | None = None, num_cpus: int = 4, log_to_driver: bool = False,
                   env: dict[str, str] | None = None, **ray_init: Any) -> Iterator[str]:
    """The HTTP base URL of a Serve instance. With `base_url` (Serve already running) nothing is started or
    stopped. Otherwise: `ray.init` unless Ray is already up (CPU only, no dashboard, the repository root on the
    workers' PYTHONPATH so classes from tests/ and benchmarks/ unpickle on replicas; `ray_init` adds or
    overrides arguments), Serve on 127.0.0.1 at a free port, and at the end `serve.shutdown()` (+
    `ray.shutdown()` if Ray was started here). `env`: environment variables Ray reads as it starts (e.g.
    configs/ray_env.py's, as the main job starts it), set for the start only. The test suite's `ray_serve` fixture
    is this too."""
    if base_url is not None:
        yield base_url.rstrip("/")
        return
    import ray
    from ray import serve

    started_ray = not ray.is_initialized()
    if started_ray:
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        with mock.patch.dict(os.environ, env or {}):  # Ray's processes, started here, inherit it
            ray.init(**{"address": "local", "num_cpus": num_cpus, "include_dashboard": False,
                        "logging_level": logging.WARNING, "log_to_driver": log_to_driver,
                        "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath, "TOKENIZERS_PARALLELISM": "false",
                                                     "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}},
                        **ray_init})
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()


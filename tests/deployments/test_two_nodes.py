"""The README's "outgrowing one machine", for real: a Ray cluster of two nodes on this machine (a head and a
second raylet on loopback, 2 CPUs each), the application deployed from a driver whose code reaches the
nodes only through `runtime_env` (`working_dir`: Ray packages this repository and ships it; the nodes'
processes have no copy of it on their path), one engine replica (2 CPUs) placed on each node by Ray, and
requests served by both nodes.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deployments.serve_testing import free_port, wait_until
from tests.deployments.test_serve_cli import BIN, REPO, _env, _stop_group

# Its own cluster (temp dir and ports): it may run beside the serial Ray/Serve tests (tests/conftest.py).
pytestmark = [pytest.mark.ray_cluster, pytest.mark.slow, pytest.mark.beside_serial]

DRIVER = textwrap.dedent(
    """
    import sys, time
    import ray
    from ray import serve

    gcs, http_port, repo = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    excludes = [".venv", ".venv-peers", ".git", "benchmarks/results", "**/__pycache__", ".mypy_cache",
                ".ruff_cache", ".pytest_cache", "*.png"]
    ray.init(address=gcs, namespace="serve", runtime_env={"working_dir": repo, "excludes": excludes})
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    from configs import EngineConfig
    from configs.serve import ServerConfig
    from deployments.builder import make_app

    engine = EngineConfig(model="default", dtype="float32", device="cpu", max_batch_size=4, max_model_len=1024)
    options = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 2}}  # one per 2-CPU node
    serve.run(make_app(engine, ServerConfig(), engine_options=options), name="baton", route_prefix="/")
    print("DEPLOYED", flush=True)
    while True:
        time.sleep(10)
    """
)


def _node_env() -> dict[str, str]:
    """The nodes' environment: no PYTHONPATH, so their processes cannot import this repository's code."""
    env = _env()
    env.pop("PYTHONPATH", None)
    return env


def _start(args: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _node_ports(workers: int) -> list[str]:
    low = 20000 + workers * 1000  # the two nodes' worker port ranges must not overlap
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 999}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bn", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_two_nodes_each_run_an_engine_and_both_serve(tmp: Path) -> None:
    gcs_port, http_port = free_port(), free_port()
    gcs = f"127.0.0.1:{gcs_port}"
    common = ["--block", "--num-cpus=2", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    head = _start([str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--include-dashboard=false",
                   f"--ray-client-server-port={free_port()}", f"--temp-dir={tmp / 'ray'}", *common, *_node_ports(0)],
                  tmp / "head.log", tmp, _node_env())
    procs = [head]
    try:
        wait_until(lambda: _run_ok(["status", f"--address={gcs}"]), timeout_s=90, interval_s=1, what="the head")
        worker = _start([str(BIN / "ray"), "start", f"--address={gcs}", *common, *_node_ports(1)],
                        tmp / "worker.log", tmp, _node_env())
        procs.append(worker)
        wait_until(lambda: _alive_nodes(gcs) == 2, timeout_s=90, interval_s=1, what="the second node")
        driver = _start([sys.executable, "-c", DRIVER, gcs, str(http_port), str(REPO)], tmp / "driver.log", REPO,
                        _env())
        procs.append(driver)
        base = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: _deployed(tmp / "driver.log", driver), timeout_s=300, interval_s=1,
                   what="the deployment on two nodes")
        wait_until(lambda: _healthy(base), timeout_s=60, interval_s=1, what="/health")

        async def load() -> list[str]:
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                bodies = [{"prompt": f"Request {i}: the capital of France is", "max_tokens": 8, "temperature": 0}
                          for i in range(16)]
                answers = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
            return [r.json()["choices"][0]["text"] for r in answers]

        texts = asyncio.run(load())
        assert all(texts)
        served: dict[str, float] = {}
        for _ in range(40):  # /stats answers from one engine replica at a time, chosen by Serve's router
            stats = httpx.get(f"{base}/stats", timeout=10).json()
            served[stats["node_id"]] = stats["metrics"]["generated_tokens_total"]
            if len(served) == 2:
                break
        assert len(served) == 2, served  # an engine replica on each node
        assert all(tokens > 0 for tokens in served.values()), served  # and both nodes served requests
    finally:
        for proc in reversed(procs):
            _stop_group(proc, first=signal.SIGTERM, grace_s=5)


def _run_ok(args: list[str]) -> bool:
    done = subprocess.run([str(BIN / "ray"), *args], env=_node_env(), capture_output=True, text=True, timeout=60,
                          check=False)
    return done.returncode == 0


def _alive_nodes(gcs: str) -> int:
    script = f"import ray; ray.init(address='{gcs}', logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    done = subprocess.run([sys.executable, "-c", script], env=_node_env(), capture_output=True, text=True, timeout=60,
                          check=False, cwd="/tmp")
    lines = done.stdout.strip().splitlines()
    return int(lines[-1]) if done.returncode == 0 and lines and lines[-1].isdigit() else 0


def _deployed(log: Path, driver: subprocess.Popen[bytes]) -> bool:
    text = log.read_text(errors="replace")
    assert driver.poll() is None, text[-4000:]
    return "DEPLOYED" in text


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=3).status_code == 200
    except httpx.HTTPError:
        return False

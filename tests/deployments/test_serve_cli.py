"""serve_config.yaml through Ray's own CLI, on loopback, with the real default model:

* `serve run serve_config.yaml` starts and answers;
* `serve deploy serve_config.yaml` to a head started with `ray start --head` deploys and answers, and a
  second deploy with a changed `user_config` changes a controller knob live (same replica).

Each test starts its processes in a new session and kills exactly that process group afterwards. The only
change to serve_config.yaml is the HTTP port (a free one, so the test never collides with a server on 8000).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from configs.ray_env import main_job_env
from configs.serve import DEFAULT_MODEL_NAME
from tests.deployments.serve_testing import free_port, wait_until

pytestmark = [pytest.mark.ray_cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
if not (BIN / "serve").exists():
    BIN = Path(shutil.which("serve") or "serve").parent


# Ray's token authentication (on by default for new clusters): the head and the CLI share a token made for
# this test run, so nothing is read from or written to ~/.ray.
_TOKEN = secrets.token_hex(32)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = _TOKEN
    return env


def _config(tmp: Path, http_port: int, user_config: dict[str, Any] | None = None) -> Path:
    cfg = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    cfg["http_options"]["port"] = http_port
    if user_config is not None:
        engine = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "BatonEngine")
        engine["user_config"].update(user_config)
    path = tmp / f"serve_config_{http_port}_{len(list(tmp.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stop_group(proc: subprocess.Popen[bytes], first: int = signal.SIGINT, grace_s: float = 10) -> None:
    """Stop the process group this test started, and nothing else: `first` for a graceful exit, then
    SIGKILL for whatever of the group is left (Ray's workers, agents)."""
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    try:
        os.killpg(pgid, first)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout_s)


def _answers(base: str) -> None:
    body = {
        "model": DEFAULT_MODEL_NAME,
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "temperature": 0,
    }
    r = httpx.post(f"{base}/v1/completions", json={**body, "stop": ["."]}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == " Paris"


def _healthy(base: str) -> bool:
    try:
        return httpx.get(f"{base}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Short: Ray's socket paths live under its temp dir and must stay under ~107 characters.
    path = Path(tempfile.mkdtemp(prefix="bt", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_serve_run_starts_and_answers(tmp: Path) -> None:
    """As scripts/run.sh starts it: with configs/ray_env.py's settings, so the ingress replica serves HTTP on its
    own port (Serve's direct ingress; 8000 in the main job, a free one here) and Serve's proxy on http_options.port.
    Both answer."""
    port, direct = free_port(), free_port()
    log = (tmp / "serve_run.log").open("wb")
    env = {**_env(), **main_job_env({}, ingress_port=direct)}
    proc = subprocess.Popen(
        [str(BIN / "serve"), "run", str(_config(tmp, port))],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for base in (f"http://127.0.0.1:{direct}", f"http://127.0.0.1:{port}"):
            deadline = time.monotonic() + 180
            while not _healthy(base):
                assert proc.poll() is None, (tmp / "serve_run.log").read_text()[-4000:]
                assert time.monotonic() < deadline, (tmp / "serve_run.log").read_text()[-4000:]
                time.sleep(1)
            _answers(base)
            models = httpx.get(f"{base}/v1/models", timeout=10).json()
            assert [m["id"] for m in models["data"]] == [DEFAULT_MODEL_NAME]
        assert f"Started HTTP server on port {direct}" in (tmp / "serve_run.log").read_text()

        # A killed ingress replica's replacement listens on the same port again.
        ingress = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "ServeReplica:baton:BatonIngress" in " ".join(p.cmdline())]
        assert len(ingress) == 1, ingress
        ingress[0].kill()
        ingress[0].wait(timeout=30)
        wait_until(lambda: _healthy(f"http://127.0.0.1:{direct}"), timeout_s=120, interval_s=1,
                   what="a replacement ingress replica on the same port")
        _answers(f"http://127.0.0.1:{direct}")
    finally:
        _stop_group(proc)
        log.close()


def test_serve_deploy_to_a_head_node_and_reconfigure_live(tmp: Path) -> None:
    http_port, dashboard_port = free_port(), free_port()
    head_log = (tmp / "head.log").open("wb")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={tmp / 'ray'}",
            "--disable-usage-stats",
        ],
        cwd=REPO,
        env=_env(),
        stdout=head_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    base = f"http://127.0.0.1:{http_port}"
    try:

        def dashboard_up() -> bool:
            assert head.poll() is None, (tmp / "head.log").read_text()[-4000:]
            try:
                auth = {"Authorization": f"Bearer {_TOKEN}"}
                return httpx.get(f"{address}/api/version", headers=auth, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(dashboard_up, timeout_s=90, interval_s=1, what="the head's dashboard")
        deployed = _run(str(BIN / "serve"), "deploy", str(_config(tmp, http_port)), "--address", address)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        wait_until(lambda: _healthy(base), timeout_s=180, interval_s=1, what="the deployed app to answer")
        _answers(base)

        before = httpx.get(f"{base}/stats", timeout=10).json()
        assert before["config"]["max_batch_size"] == 16
        assert before["config"]["controller"]["high_watermark"] == 0.9

        # Deploy again with other controller knobs: Serve calls reconfigure() on the running replica.
        knobs = {"max_batch_size": 6, "high_watermark": 0.85, "preemption_mode": "recompute"}
        redeployed = _run(
            str(BIN / "serve"), "deploy", str(_config(tmp, http_port, knobs)), "--address", address
        )
        assert redeployed.returncode == 0, redeployed.stdout + redeployed.stderr

        def reconfigured() -> dict[str, Any] | None:
            stats = httpx.get(f"{base}/stats", timeout=10).json()
            return stats if stats["config"]["max_batch_size"] == 6 else None

        after = wait_until(
            reconfigured, timeout_s=60, interval_s=0.5, what="the new user_config in the engine"
        )
        assert after["replica"] == before["replica"]  # live: the same replica, not a restart
        assert after["config"]["controller"]["high_watermark"] == 0.85
        assert after["config"]["controller"]["preemption_mode"] == "recompute"
        assert after["metrics"]["generated_tokens_total"] >= before["metrics"]["generated_tokens_total"]
        _answers(base)

        status = _run(str(BIN / "serve"), "status", "--address", address)
        assert "RUNNING" in status.stdout, status.stdout + status.stderr
    finally:
        try:
            _run(str(BIN / "serve"), "shutdown", "-y", "--address", address, timeout_s=60)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop_group(head, first=signal.SIGTERM, grace_s=3)  # Serve is already shut down
            head_log.close()

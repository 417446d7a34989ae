"""The compiled CPU kernel for a decode batch's linear layers (engine/kernels/skinny_linear.cpp).

`skinny_linear()` returns the kernel, the torch operator `torch.ops.baton.skinny_linear` (`y = x @ w.T` for
float32 `x` [n, in], `w` [out, in], both contiguous), or None where it cannot run here: not an x86 CPU with
AVX2 and FMA, no C++ compiler, or the build failed. Callers then use another kernel; nothing else changes.

The extension is built once per environment with torch's own toolchain (`torch.utils.cpp_extension`), into
`BATON_KERNEL_DIR` (default: `baton-kernels/` inside the active virtual environment, else
`~/.cache/baton-kernels`). `scripts/setup.sh` builds it (`python -m engine.cpu_kernel`), so servers and tests
find it ready; otherwise the first engine on the CPU builds it (about a minute on 2 cores, logged). It links
the OpenMP runtime torch itself loaded (the same `libgomp.so.1`), so its threads are torch's threads: a second
OpenMP pool in the process would cost every parallel region its spin-wait (benchmarks/NOTES.md, session 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "kernels" / "skinny_linear.cpp"
NAME = "baton_skinny_linear"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_lock = threading.Lock()
_loaded: dict[str, Kernel | None] = {}  # NAME -> the kernel, or None once it is known not to load here
_why_not: list[str] = []


def build_dir() -> Path:
    """Where the kernel is built: BATON_KERNEL_DIR, else inside the virtual environment where that is writable
    (one build per environment), else the user's cache."""
    configured = os.environ.get("BATON_KERNEL_DIR")
    if configured:
        return Path(configured)
    in_venv = Path(sys.prefix) / "baton-kernels"
    if sys.prefix != sys.base_prefix and (in_venv.is_dir() or os.access(sys.prefix, os.W_OK)):
        return in_venv
    return Path.home() / ".cache" / "baton-kernels"


def cpu_supports_it() -> bool:
    """AVX2 and FMA on this CPU (torch's own dispatch check: AVX2 implies FMA on every CPU torch accepts)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX2", "AVX512")


def skinny_linear() -> Kernel | None:
    """The compiled kernel, building it on first use if needed; None (with the reason in `why_not()`) where it
    cannot run on this machine."""
    if NAME in _loaded:
        return _loaded[NAME]
    with _lock:
        if NAME not in _loaded:
            _loaded[NAME] = _load()
        return _loaded[NAME]


def why_not() -> str | None:
    """Why `skinny_linear()` returned None, once it has."""
    return _why_not[-1] if _why_not else None


def _load() -> Kernel | None:
    if os.environ.get("BATON_CPU_KERNEL", "1") == "0":
        return _fail("disabled by BATON_CPU_KERNEL=0")
    if not cpu_supports_it():
        return _fail(f"this CPU lacks AVX2/FMA (torch reports {torch.backends.cpu.get_cpu_capability()})")
    from torch.utils import cpp_extension

    directory = build_dir()
    t0 = time.perf_counter()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(directory)
        built_before = any(directory.glob(f"{NAME}*.so"))
        if not built_before:
            log.warning("building the CPU decode kernel into %s (once per environment, about a minute)", directory)
        if not hasattr(torch.ops.baton, "skinny_linear"):  # (another copy of this module may have loaded it)
            cpp_extension.load(name=NAME, sources=[str(SOURCE)], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(directory), is_python_module=False, verbose=False)
        kernel: Kernel = torch.ops.baton.skinny_linear
    except Exception as exc:  # no compiler, no headers, a read-only directory: fall back, say why
        return _fail(f"build failed in {directory}: {type(exc).__name__}: {str(exc).strip()[-400:]}")
    if not built_before:
        log.warning("CPU decode kernel ready (%.0f s)", time.perf_counter() - t0)
    return kernel


STALE_LOCK_S = 600.0  # a build takes ~20-60 s; a lock this old belongs to a build that was killed


def _clear_stale_lock(directory: Path) -> None:
    """torch's build lock is a file that a killed build leaves behind, and every later load would wait on it
    forever: remove it once it is far older than any build."""
    lock = directory / "lock"
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        if age > STALE_LOCK_S:
            log.warning("removing a stale kernel build lock (%.0f s old): %s", age, lock)
            lock.unlink()


def _fail(reason: str) -> Kernel | None:
    _why_not.append(reason)
    log.warning("compiled CPU decode kernel unavailable, using the transposed-matmul kernel: %s", reason)
    return None


def main() -> int:
    """Build (or find) the kernel and check it against F.linear; exit 0 either way (the engine falls back)."""
    logging.basicConfig(level=logging.INFO, format="[setup] %(message)s")
    kernel = skinny_linear()
    if kernel is None:
        print(f"[setup] compiled CPU decode kernel: not available ({why_not()}); the engine falls back",
              file=sys.stderr)
        return 0
    x, w = torch.randn(3, 70), torch.randn(9, 70)
    err = (kernel(x, w) - torch.nn.functional.linear(x, w)).abs().max().item()
    assert err < 1e-4, f"compiled kernel disagrees with F.linear by {err}"
    print(f"[setup] compiled CPU decode kernel: ready in {build_dir()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

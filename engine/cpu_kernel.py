"""The compiled CPU kernels for the decode batch's linear layers and attention (engine/kernels/).

`skinny_linear()` returns the float32 kernel, the torch operator `torch.ops.baton.skinny_linear` (`y = x @ w.T`
for float32 `x` [n, in], `w` [out, in], both contiguous; skinny_linear.cpp), or None where it cannot run here:
not an x86 CPU with AVX2 and FMA, no C++ compiler, or the build failed. `skinny_linear_avx512()` is the same for
bfloat16 and float32 on CPUs with AVX512-BF16 (where `dtype: auto` picks bfloat16):
`torch.ops.baton_avx512.skinny_linear`, skinny_linear_avx512.cpp, with an AMX path for bfloat16 (and, for many
rows, `skinny_linear_packed` over a weight packed by `pack_weight`). `decode_attention()` is the batch forward's
attention over each row's real columns (decode_attention.cpp, AVX2/FMA; engine/attention.py). Callers then
use another kernel; nothing else changes.

The extension is built once per environment with torch's own toolchain (`torch.utils.cpp_extension`), into
`BATON_KERNEL_DIR` (default: `baton-kernels/` inside the active virtual environment, else
`~/.cache/baton-kernels`). `scripts/setup.sh` builds it (`python -m engine.cpu_kernel`), so servers and tests
find it ready; otherwise the first engine on the CPU builds it (about a minute on 2 cores, logged). Each build
is also kept under a name that hashes its source, header, flags and torch version (`prebuilt()`), and a later
process loads that copy without asking torch's build system: a copy of this repository elsewhere (a Ray
`runtime_env` working_dir, a second checkout sharing the environment) has other source paths, which torch would
take for a change and rebuild for, twice over when two replicas start at once. It links
the OpenMP runtime torch itself loaded (the same `libgomp.so.1`), so its threads are torch's threads: a second
OpenMP pool in the process would cost every parallel region its spin-wait (benchmarks/NOTES.md, session 2).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "kernels" / "skinny_linear.cpp"
NAME = "baton_skinny_linear"
# The kernels include work_share.h; torch rebuilds an extension when its source or flags change, not its headers,
# so the header's hash is a flag.
SHARE_HEADER = SOURCE.with_name("work_share.h")
_HEADER = f"-DBATON_WORK_SHARE_H={hashlib.sha256(SHARE_HEADER.read_bytes()).hexdigest()[:16]}"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", _HEADER]

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class KernelBuild:
    """One compiled kernel: its extension, its source, the flags it is built with and the operator it defines."""

    name: str
    source: Path
    flags: tuple[str, ...]
    namespace: str  # torch.ops.<namespace>.<op>
    needs: str  # what the CPU must have, for messages
    fallback: str  # what runs instead where it cannot, for messages
    op: str = "skinny_linear"


FLOAT32 = KernelBuild(NAME, SOURCE, tuple(FLAGS), "baton", "AVX2/FMA", "the transposed-matmul kernel")
AVX512 = KernelBuild("baton_skinny_linear_avx512", SOURCE.with_name("skinny_linear_avx512.cpp"),
                       ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16",
                        "-fopenmp", _HEADER), "baton_avx512", "AVX512-BF16", "the AVX2 kernel (F.linear for bfloat16)")
ATTENTION = KernelBuild("baton_decode_attention", SOURCE.with_name("decode_attention.cpp"), tuple(FLAGS),
                        "baton_attention", "AVX2/FMA", "SDPA", op="decode_attention")
# Only ATen calls (no vector code of its own): any CPU torch runs on.
# The helper threads the kernels above share their work with (work_share.cpp): plain C++ and Linux futexes.
WORK_SHARE = KernelBuild("baton_work_share", SOURCE.with_name("work_share.cpp"), ("-O2", _HEADER), "baton_share",
                         "Linux", "torch's OpenMP threads", op="api")
CAPTURED = KernelBuild("baton_captured_llama", SOURCE.with_name("captured_llama.cpp"),
                       ("-O3", "-ffp-contract=off", "-fopenmp", _HEADER),
                       "baton_captured", "a C++ compiler", "the eager forward", op="llama_decode")

_lock = threading.Lock()
_loaded: dict[str, Kernel | None] = {}  # KernelBuild.name -> the kernel, or None once it is known not to load here
_why_not: list[str] = []
_why_not_avx512: list[str] = []
_why_not_attention: list[str] = []
_why_not_captured: list[str] = []
_why_not_share: list[str] = []


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


def cpu_supports_avx512() -> bool:
    """AVX-512 with BF16 on this CPU (the `avx512_bf16` flag; the bfloat16 path multiplies with vdpbf16ps)."""
    from engine.model_loader import cpu_flags

    return torch.backends.cpu.get_cpu_capability() == "AVX512" and "avx512_bf16" in cpu_flags()


def skinny_linear() -> Kernel | None:
    """The float32 kernel, building it on first use if needed; None (with the reason in `why_not()`) where it
    cannot run on this machine."""
    return _kernel(FLOAT32, cpu_supports_it, _why_not)


def skinny_linear_avx512() -> Kernel | None:
    """The AVX-512 kernel (bfloat16 and float32), as `skinny_linear()` (the reason in `why_not_avx512()`). On
    CPUs with AMX-BF16 its bfloat16 path uses AMX tiles (`amx_in_use()`) once the OS grants the process the
    AMX tile state."""
    if AVX512.name in _loaded:
        return _loaded[AVX512.name]
    kernel = _kernel(AVX512, cpu_supports_avx512, _why_not_avx512)
    if kernel is not None:
        use_amx(True)
    return kernel


def decode_attention() -> Callable[..., torch.Tensor] | None:
    """The decode batch's attention (`torch.ops.baton_attention.decode_attention(q, k, v, mask, scale)`,
    decode_attention.cpp), as `skinny_linear()` (the reason in `why_not_attention()`)."""
    return _kernel(ATTENTION, cpu_supports_it, _why_not_attention)


def captured_llama() -> Callable[..., torch.Tensor] | None:
    """A Llama-family model's decode step and prompt prefill as operators (`torch.ops.baton_captured.llama_decode`
    and `llama_prefill`, captured_llama.cpp; engine/captured.py), as `skinny_linear()` (the reason in
    `why_not_captured()`)."""
    return _kernel(CAPTURED, lambda: True, _why_not_captured)


def _on_linux() -> bool:  # the pool sleeps on futexes
    return sys.platform.startswith("linux")


def work_share() -> Callable[..., object] | None:
    """The work-sharing pool's interface (`torch.ops.baton_share.api`, work_share.cpp), as `skinny_linear()`
    (the reason in `why_not_share()`). The other kernels load it first, so they find it; `set_share_workers` gives
    it helpers."""
    return _kernel(WORK_SHARE, _on_linux, _why_not_share)


def set_share_workers(n: int) -> int:
    """Threads that run the kernels' work from now on, the caller included: 1 is torch's OpenMP threads
    (at::parallel_for), more is the caller plus n - 1 helper threads of the pool. Returns the count in force."""
    if work_share() is None:
        return 1
    return int(torch.ops.baton_share.set_workers(n))


def share_workers() -> int:
    """The pool's current `set_share_workers` count (1 where there is no pool)."""
    return int(torch.ops.baton_share.workers()) if _loaded.get(WORK_SHARE.name) is not None else 1


SHARE_STATS = ("jobs", "chunks", "helper_chunks", "caller_sleeps", "helper_sleeps", "stalls", "job_ns", "wait_ns",
               "waits")


def share_stats() -> dict[str, int]:
    """The pool's counters since the process started (work_share.cpp, `stats`), by the names in SHARE_STATS:
    `job_ns` is the caller's time inside pool jobs, `wait_ns` the part of it spent waiting for chunks a helper had
    taken, `waits` the jobs that waited at all. All zero where the pool is not loaded."""
    if _loaded.get(WORK_SHARE.name) is None:
        return dict.fromkeys(SHARE_STATS, 0)
    return dict(zip(SHARE_STATS, (int(v) for v in torch.ops.baton_share.stats()), strict=True))


def use_amx(on: bool) -> bool:
    """Switch the AVX-512 kernel's bfloat16 AMX path on (where this CPU and OS allow it) or off; returns whether it is on.
    Both paths give a row the same bits in any batch; they differ from each other, so one process keeps one."""
    from engine.model_loader import cpu_flags

    allowed = on and os.environ.get("BATON_AMX", "1") != "0" and {"amx_tile", "amx_bf16"} <= cpu_flags()
    if allowed:
        init = getattr(torch._C._cpu, "_init_amx", None)  # asks Linux for the AMX tile state (arch_prctl)
        allowed = bool(init is not None and init())
    return bool(torch.ops.baton_avx512.enable_amx(allowed))


def amx_in_use() -> bool:
    """Whether the AVX-512 kernel runs its bfloat16 AMX path in this process."""
    return _loaded.get(AVX512.name) is not None and bool(torch.ops.baton_avx512.amx_enabled())


def why_not() -> str | None:
    """Why `skinny_linear()` returned None, once it has."""
    return _why_not[-1] if _why_not else None


def why_not_avx512() -> str | None:
    """Why `skinny_linear_avx512()` returned None, once it has."""
    return _why_not_avx512[-1] if _why_not_avx512 else None


def why_not_attention() -> str | None:
    """Why `decode_attention()` returned None, once it has."""
    return _why_not_attention[-1] if _why_not_attention else None


def why_not_share() -> str | None:
    """Why `work_share()` returned None, once it has."""
    return _why_not_share[-1] if _why_not_share else None


def why_not_captured() -> str | None:
    """Why `captured_llama()` returned None, once it has."""
    return _why_not_captured[-1] if _why_not_captured else None


def _kernel(build: KernelBuild, supported: Callable[[], bool], reasons: list[str]) -> Kernel | None:
    if build.name in _loaded:
        return _loaded[build.name]
    with _lock:
        if build.name not in _loaded:
            _loaded[build.name] = _load(build, supported, reasons)
        return _loaded[build.name]


def _load(build: KernelBuild, supported: Callable[[], bool], reasons: list[str]) -> Kernel | None:
    if os.environ.get("BATON_CPU_KERNEL", "1") == "0":
        return _fail(build, reasons, "disabled by BATON_CPU_KERNEL=0")
    if build is not WORK_SHARE and WORK_SHARE.name not in _loaded:  # before any kernel looks for it
        _loaded[WORK_SHARE.name] = _load(WORK_SHARE, _on_linux, _why_not_share)
    if not supported():
        return _fail(build, reasons, f"this CPU lacks {build.needs} (torch reports {torch.backends.cpu.get_cpu_capability()})")
    from torch.utils import cpp_extension

    directory = build_dir()
    t0 = time.perf_counter()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _clear_stale_lock(directory)
        kept = prebuilt(build, directory)
        built_before = kept.is_file() or (directory / f"{build.name}.so").is_file()
        ops = getattr(torch.ops, build.namespace)
        if not hasattr(ops, build.op) and kept.is_file():  # (another copy of this module may have loaded it)
            try:
                torch.ops.load_library(str(kept))
            except (OSError, RuntimeError) as exc:  # unreadable or damaged: build it again
                log.warning("kept CPU kernel %s did not load (%s); building it again", kept, exc)
        if not hasattr(ops, build.op):
            if not built_before:
                log.warning("building the CPU decode kernel %s into %s (once per environment, about a minute)",
                            build.name, directory)
            cpp_extension.load(name=build.name, sources=[str(build.source)], extra_cflags=list(build.flags),
                               extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False,
                               verbose=False)
            _keep(directory / f"{build.name}.so", kept)
        kernel: Kernel = getattr(ops, build.op)
    except Exception as exc:  # no compiler, no headers, a read-only directory: fall back, say why
        return _fail(build, reasons, f"build failed in {directory}: {type(exc).__name__}: {str(exc).strip()[-400:]}")
    if not built_before:
        log.warning("CPU decode kernel %s ready (%.0f s)", build.name, time.perf_counter() - t0)
    return kernel


def prebuilt(build: KernelBuild, directory: Path) -> Path:
    """Where a finished build of `build` is kept: named by a hash of what its binary depends on (the source's and
    the headers' bytes, the flags, the torch version), not by where the source lies."""
    digest = hashlib.sha256()
    for part in (build.name, torch.__version__, *build.flags):
        digest.update(part.encode() + b"\0")
    for path in (build.source, *sorted(build.source.parent.glob("*.h"))):
        digest.update(path.read_bytes())
    return directory / f"{build.name}.{digest.hexdigest()[:16]}.so"


def _keep(built: Path, kept: Path) -> None:
    """Copy a fresh build to its hashed name (atomically: a process may load it while another writes it) and drop
    the copies of older sources."""
    partial = kept.with_name(f"{kept.name}.{os.getpid()}.partial")
    try:
        shutil.copy2(built, partial)
        os.replace(partial, kept)
    except OSError as exc:  # a full disk: this process has its kernel; the next one builds (or checks) again
        log.warning("could not keep the CPU kernel as %s: %s", kept, exc)
        with contextlib.suppress(OSError):
            partial.unlink()
        return
    stem = kept.name.split(".", 1)[0]
    for old in kept.parent.glob(f"{stem}.*.so"):
        if old != kept and old.name.count(".") == 2:
            with contextlib.suppress(OSError):
                old.unlink()


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


def _fail(build: KernelBuild, reasons: list[str], reason: str) -> Kernel | None:
    reasons.append(reason)
    log.warning("compiled CPU decode kernel %s unavailable, using %s: %s", build.name, build.fallback, reason)
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
    _check_attention()
    step = "ready" if captured_llama() is not None else f"not available ({why_not_captured()}); the eager forward runs"
    print(f"[setup] captured forwards: {step}", file=sys.stderr)
    share = "ready" if work_share() is not None else f"not available ({why_not_share()}); kernels use OpenMP threads"
    print(f"[setup] work-sharing pool: {share}", file=sys.stderr)
    wide = skinny_linear_avx512()
    if wide is None:
        print(f"[setup] AVX-512 CPU decode kernel: not available ({why_not_avx512()}); bfloat16 uses F.linear",
              file=sys.stderr)
        return 0
    xb, wb = x.bfloat16(), w.bfloat16()
    err = (wide(xb, wb).float() - (xb.double() @ wb.double().T).float()).abs().max().item()
    assert err < 0.1, f"AVX-512 kernel (bfloat16) disagrees with the exact product by {err}"
    err = (wide(x, w) - torch.nn.functional.linear(x, w)).abs().max().item()
    assert err < 1e-4, f"AVX-512 kernel (float32) disagrees with F.linear by {err}"
    print(f"[setup] AVX-512 CPU decode kernel: ready in {build_dir()} (AMX: {amx_in_use()})", file=sys.stderr)
    return 0


def _check_attention() -> None:
    """Build (or find) the attention kernel and check it against SDPA on a small left-padded batch."""
    attend = decode_attention()
    if attend is None:
        print(f"[setup] attention kernel: not available ({why_not_attention()}); the engine uses SDPA", file=sys.stderr)
        return
    q, k, v = torch.randn(3, 4, 1, 16), torch.randn(3, 2, 9, 16), torch.randn(3, 2, 9, 16)
    mask = torch.arange(9)[None, :] >= torch.tensor([0, 4, 8])[:, None]  # [rows, columns], left-padded
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=mask[:, None, None, :]).transpose(1, 2)
    err = (attend(q, k, v, mask[:, None, :], 0.25) - ref).abs().max().item()
    assert err < 1e-4, f"attention kernel disagrees with SDPA by {err}"
    print(f"[setup] attention kernel: ready in {build_dir()}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())

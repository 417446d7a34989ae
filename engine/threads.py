"""Which threads compute each forward on CPU: torch's OpenMP threads, or the kernels' work-sharing pool.

OpenMP splits every parallel region into one fixed range per thread and joins at a barrier, so each of a decode
step's ~240 regions waits for its slowest thread. Beside a partly busy core (a Serve replica's own proxy,
ingress and client take ~0.4 of one) the thread that loses its core stalls them all: through HTTP the engine's
two-thread forward measured slower than its one-thread forward offline (benchmarks/NOTES.md, session 13). The
engine's compiled kernels can instead split their work through a pool of their own (engine/kernels/work_share.cpp):
the calling thread and helper threads take small chunks (each from its own range first, then from the others'),
and the caller waits only for chunks a helper actually took, so a helper that is not running costs nothing but its share of the work.

So where a decode step runs as the captured operator (every linear and the attention in those kernels) it runs on
the pool, and so do prompt forwards whose linears all go through the kernels (`ModelRunner.packs`; their SDPA then
runs on one thread). Every other forward keeps torch's OpenMP threads (F.linear's GEMMs, whose bits may depend on
the thread count). The rest of an iteration runs with torch on one thread in that mode: an OpenMP thread spins
~10 ms after each parallel region, and on the helper's core it would take the helper's place. The helpers run at SCHED_IDLE: they
use only CPU time nothing else wants, and a core running only them counts as idle when Linux places a waking
thread, so a Serve replica's proxy and ingress wake there rather than preempt the calling thread. A row's bits do
not depend on which thread computed it (each output element is one chunk's, in a fixed order), so the mode never
changes tokens (tests/engine/test_work_share.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from engine import cpu_kernel


@dataclass
class ComputeThreads:
    """The CPU threads of one engine: `most` configured; `shared`: its captured decode steps run on the pool."""

    most: int
    shared: bool = False

    @classmethod
    def build(cls, most: int, work_sharing: bool) -> ComputeThreads:
        """`work_sharing` where the pool builds here (cpu_kernel.work_share) and there is more than one thread."""
        shared = work_sharing and most > 1 and cpu_kernel.work_share() is not None
        return cls(most, shared)

    @contextlib.contextmanager
    def iteration(self) -> Iterator[None]:
        """Torch's threads while the runner executes an iteration: one where its forwards use the pool (everything
        outside them, the sampler included, then runs on the calling thread), then back to the caller's count, so
        nothing outside the engine sees the change."""
        with self.forward(1) if self.shared else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def forward(self, n: int, pooled: bool = False) -> Iterator[None]:
        """A forward on `n` threads, then back to the state before: the pool's where `pooled` (its linears and
        attention go through the kernels: a captured decode step, prompts that pack; SDPA then runs on one thread)
        and this engine shares, else torch's."""
        get: Callable[[], int] = torch.get_num_threads
        put: Callable[[int], object] = torch.set_num_threads
        if self.shared and pooled:
            get, put = cpu_kernel.share_workers, cpu_kernel.set_share_workers
        before = get()
        put(n)
        try:
            yield
        finally:
            put(before)


def normal_policy() -> None:
    """Back to SCHED_OTHER if the calling thread inherited SCHED_BATCH (a Serve replica puts the threads around the
    engine at SCHED_BATCH, deployments/thread_policy.py; the compute thread must keep preempting them)."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return
    try:
        if os.sched_getscheduler(0) == batch:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass

"""The scheduling policy of a Serve replica's threads around the engine's compute thread (Linux).

Through HTTP on a 2-core machine the engine's compute thread shares its core with whatever wakes there: Ray's and
Serve's threads in the engine replica (its streaming generators, their serialisation pool, the event loops), the
ingress replica's, the client's. Each wake-up of a normal thread may preempt the compute thread at once. A thread
at SCHED_BATCH never preempts a running thread when it wakes: it runs when a CPU is free (a core running only the
pool's SCHED_IDLE helpers counts as free) or at the running thread's next slice. Measured through HTTP (bf16, 16
in flight, a fresh Ray per pass, 3 pairs, benchmarks/NOTES.md, session 14): chat 375.8 -> 389.8 tok/s, anyscale
259.9 -> 266.5 (medians), the ingress's CPU 0.20 -> 0.17 of a core.

So each replica puts its own threads at SCHED_BATCH when it starts, before the engine's loop thread exists.
Threads created later inherit the policy of the thread that creates them: Ray's and Serve's keep SCHED_BATCH,
while the engine's compute thread sets itself back to SCHED_OTHER as it starts (`engine.threads.normal_policy`),
so the threads it creates (torch's OpenMP workers, the pool's helpers, which then go to SCHED_IDLE) start from
SCHED_OTHER too. Changing to SCHED_BATCH needs no privilege. Elsewhere than Linux nothing changes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TASKS = Path("/proc/self/task")
HELPER_NAME = "baton-share"  # the pool's helper threads (engine/kernels/work_share.cpp)


def batch_threads(keep: frozenset[int] = frozenset()) -> int:
    """Put every thread of this process at SCHED_BATCH except the native thread ids in `keep` and the pool's
    helpers; returns how many changed (0 where the platform has no such policy)."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not TASKS.is_dir():
        return 0
    changed = 0
    for entry in TASKS.iterdir():
        tid = int(entry.name)
        try:
            if tid in keep or (entry / "comm").read_text().strip() == HELPER_NAME:
                continue
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            changed += 1
        except OSError:  # the thread has ended, or the policy is refused here
            continue
    log.info("%d threads of this replica at SCHED_BATCH", changed)
    return changed

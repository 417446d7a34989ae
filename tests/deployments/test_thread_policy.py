"""deployments/thread_policy.py and engine.threads.normal_policy, in a child process (the policies it sets would
otherwise stay on this test process's threads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policies")

CHILD = r"""
import os, threading
from deployments import thread_policy
from engine.threads import normal_policy

go = threading.Event()
named = threading.Barrier(4)  # the three workers, named, and this thread: no policy is set before the names
def worker(name=None):
    if name:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", "w") as f:
            f.write(name)
    named.wait()
    go.wait()
threads = [threading.Thread(target=worker, args=(n,)) for n in (None, "baton-share", None)]
for t in threads:
    t.start()
named.wait()
plain, helper, kept = (t.native_id for t in threads)
changed = thread_policy.batch_threads(keep=frozenset({kept}))
policy = os.sched_getscheduler
print("CHANGED", changed)
print("POLICIES", policy(plain) == os.SCHED_BATCH, policy(helper) == os.SCHED_OTHER,
      policy(kept) == os.SCHED_OTHER, policy(threading.get_native_id()) == os.SCHED_BATCH)
seen = []
def child():  # created by a SCHED_BATCH thread: inherits it; normal_policy puts it back
    seen.append(policy(0) == os.SCHED_BATCH)
    normal_policy()
    seen.append(policy(0) == os.SCHED_OTHER)
c = threading.Thread(target=child); c.start(); c.join()
print("CHILD", *seen)
go.set()
"""


def test_batch_threads_spares_the_kept_and_the_helpers_and_normal_policy_restores() -> None:
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert int(lines["CHANGED"]) >= 2  # the main thread and the plain worker at least
    assert lines["POLICIES"] == "True True True True"
    assert lines["CHILD"] == "True True"

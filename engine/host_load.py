"""How busy other processes keep this host's CPUs: the cores in use, from /proc/stat, minus this process's own.

The thread tuner (engine/thread_tuner.py) asks it before trying all threads again from one: while another
process still holds a core, that trial only repeats the collapse it measured. /proc/stat counts in clock ticks
(10 ms), so the figure is taken over the last several samples (a few decode steps, a few hundred ms).
Where /proc/stat is missing (not Linux) or counts more CPUs than this process may use (a container limited by
affinity sees the host's), the load is unknown (None), and the tuner falls back to trying on its period.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

_STAT = Path("/proc/stat")
_TICK_S = 1.0 / (os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100)


def _busy_s(stat: Path = _STAT) -> float | None:
    """CPU seconds all CPUs have spent busy since boot (the first line); None where unreadable."""
    try:
        with stat.open() as f:
            head = f.readline().split()
    except OSError:
        return None
    if len(head) < 5 or head[0] != "cpu":
        return None
    ticks = [int(v) for v in head[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) * _TICK_S


def _cpus(stat: Path = _STAT) -> int:
    """The CPUs /proc/stat counts (its cpuN lines); 0 where unreadable."""
    try:
        with stat.open() as f:
            return sum(1 for line in f if line.startswith("cpu") and line[3:4].isdigit())
    except OSError:
        return 0


class OtherLoad:
    """Cores kept busy by other processes over the last `window` samples. Call `sample()` after each step whose
    load matters (the tuner: steps at one thread), `clear()` to start a new window."""

    def __init__(self, window: int = 8, stat: Path = _STAT) -> None:
        self._stat = stat
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=window)
        allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.usable = _busy_s(stat) is not None and (allowed is None or _cpus(stat) == allowed)

    def sample(self) -> None:
        if not self.usable:
            return
        busy = _busy_s(self._stat)
        if busy is None:
            self.usable = False
            return
        self._samples.append((time.perf_counter(), busy, time.process_time()))

    def clear(self) -> None:
        self._samples.clear()

    def cores(self) -> float | None:
        """Other processes' busy cores over the window (None: unknown, or too short to resolve clock ticks)."""
        if not self.usable or len(self._samples) < 2:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._samples[0], self._samples[-1]
        if t1 - t0 < 20 * _TICK_S:
            return None
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))

"""Measurements taken from outside a system: its model forwards (hooks) and the process's peak memory."""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


class ForwardMeter:
    """Counts and times every forward of `model` (hooks on the top module, any thread).

    slots: input positions computed, rows x width of `input_ids` summed over forwards ([1, tokens] for a
    packed continuous-batching step). seconds: wall time inside the forwards. ends: perf_counter at the end of
    each forward. threads: torch intra-op threads seen by the thread that ran the forward.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls = 0
        self.slots = 0
        self.seconds = 0.0
        self.ends: list[float] = []
        self.threads: set[int] = set()
        self._local = threading.local()
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardMeter:
        self._handles = [self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.model.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def first_end_after(self, t: float) -> float | None:
        return next((e for e in self.ends if e >= t), None)

    def _pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"][..., 0]
        self.slots += int(ids.numel())
        self.threads.add(torch.get_num_threads())
        self._local.start = time.perf_counter()

    def _post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        end = time.perf_counter()
        self.seconds += end - self._local.start
        self.ends.append(end)
        self.calls += 1


class PeakMemory:
    """Peak memory of one run: the process's resident-set high-water mark on CPU, allocated bytes on CUDA.

    On Linux the RSS high-water mark (VmHWM) is reset at the start of each run (`/proc/self/clear_refs`), after
    garbage collection and `malloc_trim`, so each run's peak is its own (model weights included).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start_bytes = 0
        self.peak_bytes = 0
        self.resettable = device.type == "cuda" or _reset_hwm()
        if device.type == "cuda":
            self.kind = "peak CUDA memory allocated"
        elif self.resettable:
            self.kind = "peak RSS of the process during the run (VmHWM reset per run; weights included)"
        else:
            self.kind = "RSS high-water of the process so far (not resettable here; weights included)"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            _reset_hwm()
            self.start_bytes = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak_bytes = _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _ru_maxrss()


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _reset_hwm() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Hand freed heap pages back to the OS so one run's garbage does not count in the next run's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuMeter:
    """How much CPU "we" and everyone else used during a run (Linux /proc; zeros elsewhere).

    We are this process, or with `tree=True` this process and all its descendants (for an HTTP benchmark: the
    client, and the Ray processes and replicas it started; a Ray instance started by another process, e.g.
    `ray start`, counts as others). `others_cores` = CPU-seconds used by other processes per wall second: ~0
    on a quiet machine. With 2 torch threads on 2 cores, anything well above 0 slows every parallel region
    (threads wait on a descheduled peer).
    """

    def __init__(self, tree: bool = False) -> None:
        import os

        root = os.getpid()
        self._ours: Callable[[], float] = (lambda: _tree_cpu_s(root)) if tree else _own_cpu_s
        self.wall_s = self.own_cpu_s = self.all_busy_s = 0.0

    def __enter__(self) -> CpuMeter:
        self._t, self._own, self._busy = time.perf_counter(), self._ours(), _busy_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._t
        # A process of the tree that exited during the run takes its CPU time with it (rare: replicas live on).
        self.own_cpu_s = max(0.0, self._ours() - self._own)
        self.all_busy_s = _busy_cpu_s() - self._busy

    @property
    def own_cores(self) -> float:
        return self.own_cpu_s / self.wall_s if self.wall_s else 0.0

    @property
    def others_cores(self) -> float:
        return max(0.0, self.all_busy_s - self.own_cpu_s) / self.wall_s if self.wall_s else 0.0


def _own_cpu_s() -> float:
    import os

    t = os.times()
    return t.user + t.system


def _busy_cpu_s() -> float:
    """CPU-seconds all processes have spent busy (user, nice, system, irq, softirq, steal) since boot."""
    import os

    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(root: int) -> float:
    """CPU-seconds (user + system) of `root` and its live descendants, from /proc/<pid>/stat."""
    import os

    parent: dict[int, int] = {}
    cpu: dict[int, int] = {}
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ..., utime, stime
        parent[pid] = int(fields[1])
        cpu[pid] = int(fields[11]) + int(fields[12])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += cpu.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")

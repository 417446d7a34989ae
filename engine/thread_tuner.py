"""How many torch threads the decode steps use on CPU, chosen by measuring, now and then.

With 2 OpenMP threads on 2 cores, a step is a few hundred small parallel regions, each waiting for its
slowest thread. When another process takes one core, the thread that loses it stalls every region: the
engine kept 29-32% of its quiet throughput (`benchmarks/contention.py`), where one thread keeps 95-100%.
Quiet, two threads are ~1.3-1.5x faster than one. So the tuner runs the configured count, tries the other
count for `trial` steps after the first `first` decode steps and then every `period`, and keeps whichever
was faster per step. Decode steps of
neighbouring iterations have nearly the same shape, so their times compare fairly.

A row's result does not depend on the thread count (each output element has one summation order in the
decode kernels; `tests/engine/test_thread_tuner.py` checks whole generations at 1 and 2 threads), so
switching never changes tokens.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class ThreadTuner:
    """Chooses 1 or `most` threads for the next decode step. Call `before()` then `after(seconds)`."""

    most: int
    period: int = 32  # decode steps between trials of the other count
    first: int = 8  # decode steps before the first trial (contention may be there from the start)
    trial: int = 3  # steps per trial (and steps of the current count it is compared against)
    margin: float = 0.9  # the other count must be this much faster (time ratio) to be adopted
    current: int = 0  # threads in use (0: not started)
    _steps: int = 0
    _trying: int = 0  # trial steps left
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=8))  # step times at `current`
    _trial_times: list[float] = field(default_factory=list)
    _tried: bool = False
    switches: int = 0

    def __post_init__(self) -> None:
        self.current = self.most

    @property
    def other(self) -> int:
        return 1 if self.current == self.most else self.most

    def threads(self) -> int:
        """The thread count the next step runs with."""
        return self.other if self._trying else self.current

    def before(self) -> None:
        """Set torch's threads for the next decode step (starting a trial when one is due)."""
        due = self.period if self.switches or self._tried else self.first
        if not self._trying and self._steps >= due and len(self._recent) >= self.trial:
            self._tried = True
            self._trying, self._trial_times = self.trial, []
        torch.set_num_threads(self.threads())

    def after(self, seconds: float) -> None:
        """Record the step's time; at the end of a trial, keep the faster count. Torch's thread count goes
        back to `most`, so nothing outside the decode step (prefills, other engines in the process) sees the
        tuner's choice."""
        torch.set_num_threads(self.most)
        self._steps += 1
        if not self._trying:
            self._recent.append(seconds)
            return
        self._trial_times.append(seconds)
        self._trying -= 1
        if self._trying:
            return
        self._steps = 0
        tried = sorted(self._trial_times)[len(self._trial_times) // 2]  # median: one hiccup decides nothing
        baseline = sorted(self._recent)[len(self._recent) // 2]
        if tried < self.margin * baseline:
            log.info("decode steps now use %d torch thread(s), not %d: %.1f against %.1f ms per step",
                     self.other, self.current, 1e3 * tried, 1e3 * baseline)
            self.current, self.switches = self.other, self.switches + 1
            self._recent.clear()
            self._recent.append(tried)

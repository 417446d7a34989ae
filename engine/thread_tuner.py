"""How many threads the decode steps use on CPU, chosen by measuring, when the CPU says it is worth it.

With 2 OpenMP threads on 2 cores, a step is a few hundred small parallel regions, each waiting for its
slowest thread. When another process takes a whole core, the thread that loses it stalls every region: the
engine kept 25-32% of its quiet throughput (`benchmarks/contention.py`), where one thread keeps 92-100%.
Quiet, or beside a lighter load such as a Serve replica's own ingress and proxy, two threads are ~1.2-1.5x
faster than one, and every step tried on one thread there is lost.

So the tuner watches each decode step's CPU share: the process's CPU time over the step's wall time times its
threads (~1.0 quiet, ~0.87 beside a process busy a third of a core, where two threads still win, ~0.73 beside
a busy core, where one thread is twice as fast; `benchmarks/NOTES.md`, session 11). While the median share
of recent steps at all threads stays at or above `gate`, nothing is tried. Below it, one thread is tried for
`trial` steps (after `first` decode steps, then at most every `period`), and whichever count was faster per
step is kept. At one thread the share says nothing about the other core, so the tuner asks the host
(engine/host_load.py) how many cores other processes keep busy, and tries all threads on the period while
that is below `free` (or unknown). A trial that keeps the current count doubles the period (up to
`longest`); a switch resets it.
Decode steps of neighbouring iterations have nearly the same shape, so their times compare fairly.

A burst's prompts are prefilled in its first iterations, before there are decode steps to compare, and beside a
busy core they take ~4x their quiet time at all threads (benchmarks/NOTES.md, session 12). So the tuner also
reads the CPU share of each iteration's prompt forwards (`prompts`): when the median of the last few that ran at
all threads is below `drop` (quiet prompt forwards get 0.97-1.00 of their CPU time, beside a busy core 0.59-0.75),
it moves to one thread at once, without a trial; trials of all threads then go on as above.

On the kernels' work-sharing pool (`pooled`; engine/threads.py) a step beside a busy core loses only the work the
helper cannot do, not the whole step, so at one thread all threads are tried on the period whatever the load, and
prompt forwards on the pool say nothing to the tuner (the runner does not report them); the trials decide.

A row's result does not depend on the thread count (each output element has one summation order in the
decode kernels; `tests/engine/test_thread_tuner.py` checks whole generations at 1 and 2 threads), so
switching never changes tokens.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from engine.host_load import OtherLoad

log = logging.getLogger(__name__)


def _median(values: deque[float] | list[float]) -> float:
    return sorted(values)[len(values) // 2]


@dataclass
class ThreadTuner:
    """Chooses 1 or `most` threads for the next decode step: `n = before()`, the step on n threads, then
    `after(seconds, cpu_seconds)`."""

    most: int
    period: int = 32  # decode steps between trials, at first and after a switch
    longest: int = 256  # the period doubles after each trial that keeps the current count, up to this
    first: int = 8  # decode steps before the first trial (contention may be there from the start)
    trial: int = 3  # steps per trial (and steps of the current count it is compared against)
    margin: float = 0.9  # the other count must be this much faster (time ratio) to be adopted
    gate: float = 0.8  # at `most` threads, one is tried only while the steps' median CPU share is below this
    free: float = 0.5  # at one thread, all are tried only while other processes keep fewer cores busy than this
    drop: float = 0.8  # at `most` threads, prompt forwards whose median CPU share is below this move to one thread
    shortest: float = 0.02  # prompt forwards shorter than this (seconds) say too little to count
    load: OtherLoad | None = None  # other processes' load (None, or unknown: all threads are tried on the period)
    pooled: bool = False  # the steps run on the kernels' work-sharing pool (engine/threads.py), not OpenMP
    current: int = 0  # threads in use (0: not started)
    _steps: int = 0
    _period: int = 0  # the period now (0: not started)
    _trying: int = 0  # trial steps left
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=8))  # step times at `current`
    _shares: deque[float] = field(default_factory=lambda: deque(maxlen=8))  # their CPU shares
    _trial_times: list[float] = field(default_factory=list)
    _prompt_shares: deque[float] = field(default_factory=lambda: deque(maxlen=3))  # prompt forwards at `most`
    switches: int = 0
    trials: int = 0

    def __post_init__(self) -> None:
        self.current = self.most
        self._period = self.period

    @property
    def other(self) -> int:
        return 1 if self.current == self.most else self.most

    def threads(self) -> int:
        """The thread count the next step runs with."""
        return self.other if self._trying else self.current

    def worth_trying(self) -> bool:
        """Whether a trial may pay: at all threads while the recent steps got less than `gate` of their threads'
        CPU time; at one thread unless other processes are known to keep `free` cores or more busy."""
        if self.current == self.most:
            return len(self._shares) >= self.trial and _median(self._shares) < self.gate
        if self.pooled:  # a helper beside a busy core only does less: trying all threads costs little
            return True
        others = self.load.cores() if self.load is not None else None
        return others is None or others < self.free

    def before(self) -> int:
        """The thread count for the next decode step (starting a trial when one is due). The caller applies it for
        that step only (engine/threads.py), so nothing outside the decode step (prefills, other engines in the
        process) sees the tuner's choice."""
        due = self._period if self.trials else self.first
        if not self._trying and self._steps >= due and len(self._recent) >= self.trial and self.worth_trying():
            self.trials += 1
            self._trying, self._trial_times = self.trial, []
        return self.threads()

    def prompts(self, seconds: float, cpu_seconds: float, threads: int) -> None:
        """Record an iteration's prompt forwards (wall and process CPU time, run at `threads`). At all threads, when
        the median CPU share of the last ones (at least 2) is below `drop`, switch to one thread now."""
        if threads != self.most or self.current != self.most or self._trying or seconds < self.shortest:
            return
        self._prompt_shares.append(cpu_seconds / (seconds * threads))
        share = _median(self._prompt_shares)
        if len(self._prompt_shares) < 2 or share >= self.drop:
            return
        log.info("decode steps now use 1 thread, not %d: prompt forwards got %.2f of their threads' CPU time",
                 self.most, share)
        self._switch(None)

    def _switch(self, tried: float | None) -> None:
        """Adopt the other count (`tried`: its step time in the trial, if there was one) and start afresh."""
        self.current, self.switches, self._period, self._steps = self.other, self.switches + 1, self.period, 0
        self._recent.clear()
        if tried is not None:
            self._recent.append(tried)
        self._shares.clear()
        self._prompt_shares.clear()
        if self.load is not None:
            self.load.clear()  # its window starts with this stretch at the new count

    def after(self, seconds: float, cpu_seconds: float) -> None:
        """Record the step's wall time and the process's CPU time over it (its CPU share: `cpu_seconds` over
        `seconds` times the step's threads); at the end of a trial, keep the faster count."""
        share = cpu_seconds / (max(seconds, 1e-9) * self.threads())
        if self.load is not None and self.current != self.most:  # only asked at one thread
            self.load.sample()
        self._steps += 1
        if not self._trying:
            self._recent.append(seconds)
            self._shares.append(share)
            return
        self._trial_times.append(seconds)
        self._trying -= 1
        if self._trying:
            return
        self._steps = 0
        tried = _median(self._trial_times)  # one hiccup decides nothing
        baseline = _median(self._recent)
        if tried < self.margin * baseline:
            log.info("decode steps now use %d thread(s), not %d: %.1f against %.1f ms per step",
                     self.other, self.current, 1e3 * tried, 1e3 * baseline)
            self._switch(tried)
        else:
            self._period = min(2 * self._period, self.longest)

"""Simulated probe: an accounted budget plus a scripted external-pressure trace. Deterministic; for CPU."""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field

from autoscaler.probes.base import MemoryReading
from configs.controller import PressureEvent


@dataclass(frozen=True)
class SimulatedProbe:
    """`used = engine_bytes + external(iteration)`, `total = budget_bytes`.

    `external(i)` is the fraction of the budget held by "another tenant" per the latest event at or before
    iteration `i` (0 before the first event).
    """

    budget_bytes: int
    pressure_trace: tuple[PressureEvent, ...] = ()
    name: str = field(default="simulated", init=False)
    sees_whole_cache: bool = field(default=False, init=False)  # counts only what the engine accounts
    _starts: tuple[int, ...] = field(default=(), init=False, repr=False)  # event iterations, ascending

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be > 0, got {self.budget_bytes!r}")
        # Sorted once so each read is a binary search; a stable sort keeps the later of two same-iteration events.
        trace = tuple(sorted(self.pressure_trace, key=lambda e: e.iteration))
        object.__setattr__(self, "pressure_trace", trace)
        object.__setattr__(self, "_starts", tuple(e.iteration for e in trace))

    def external_bytes(self, iteration: int) -> int:
        """Bytes another tenant holds at `iteration`."""
        at = bisect_right(self._starts, iteration)
        return 0 if at == 0 else int(self.pressure_trace[at - 1].fraction * self.budget_bytes)

    def read(self, engine_bytes: int, iteration: int) -> MemoryReading:
        return MemoryReading(
            used_bytes=engine_bytes + self.external_bytes(iteration),
            total_bytes=self.budget_bytes,
            engine_bytes=engine_bytes,
            source=self.name,
        )

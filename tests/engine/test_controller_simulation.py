"""The memory controller driving a fake batch, iteration by iteration: deterministic, pure CPU, no model.

The fake batch keeps the real cache's accounting (docs/architecture.md, "The cache"): one left-padded cache `[rows, L]` where L
is the longest row, one column appended per step, rows leave when done and the cache is trimmed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from autoscaler.probes import SimulatedProbe
from configs.controller import ControllerConfig, PressureEvent
from engine.capacity import CapacityDecision, CapacitySnapshot, QueuedInfo, RowInfo
from engine.memory_controller import MemoryController

BPT = 1_000  # cache bytes per token (all layers, K and V)
STEP = 5_000  # activation + logits peak per row of one step
WEIGHTS = 200_000


@dataclass
class Req:
    rid: str
    priority: int
    arrival: int
    prompt: int
    max_tokens: int
    generated: int = 0
    preemptions: int = 0
    state: str = "waiting"  # waiting | swapped | running | finished

    @property
    def length(self) -> int:
        return self.prompt + self.generated


@dataclass
class FakeBatch:
    controller: MemoryController
    probe: SimulatedProbe
    max_rows: int
    reqs: list[Req] = field(default_factory=list)
    peaks: list[int] = field(default_factory=list)  # true peak bytes of each step, all tenants
    decisions: list[CapacityDecision] = field(default_factory=list)

    def _in(self, *states: str) -> list[Req]:
        return [r for r in self.reqs if r.state in states]

    def _width(self) -> int:
        return max((r.length for r in self._in("running")), default=0)

    def iterate(self, i: int) -> None:
        running = self._in("running")
        width = self._width()
        engine_bytes = WEIGHTS + len(running) * width * BPT
        snapshot = CapacitySnapshot(
            iteration=i,
            max_rows=self.max_rows,
            rows=tuple(
                RowInfo(r.rid, r.priority, r.arrival, r.length, r.max_tokens - r.generated, r.preemptions)
                for r in running
            ),
            candidates=tuple(
                QueuedInfo(
                    r.rid,
                    r.priority,
                    r.arrival,
                    r.length,
                    "swapped" if r.state == "swapped" else "waiting",
                    r.preemptions,
                    r.max_tokens - r.generated,
                )
                for r in self._in("waiting", "swapped")
            ),
            waiting=len(self._in("waiting")),
            batch_length=width,
            bytes_per_token=BPT,
            step_bytes_per_row=STEP,
            swapped_bytes=sum(r.length * BPT for r in self._in("swapped")),
            memory=self.probe.read(engine_bytes, i),
        )
        decision = self.controller.decide(snapshot)
        self.decisions.append(decision)
        by_id = {r.rid: r for r in self.reqs}
        for p in decision.preempt:
            victim = by_id[p.request_id]
            assert victim.state == "running"
            victim.state = "swapped" if p.mode == "swap" else "waiting"
            victim.preemptions += 1
        for rid in decision.admit:
            assert by_id[rid].state in ("waiting", "swapped")
            by_id[rid].state = "running"
        running = self._in("running")
        assert len(running) <= decision.capacity <= self.max_rows
        width = self._width() + 1  # the step appends one column
        self.peaks.append(WEIGHTS + len(running) * (width * BPT + STEP) + self.probe.external_bytes(i))
        for r in running:
            r.generated += 1
            if r.generated >= r.max_tokens:
                r.state = "finished"


def _run(
    config: ControllerConfig, arrivals: dict[int, list[Req]], iterations: int, max_rows: int
) -> FakeBatch:
    assert config.memory_budget_bytes is not None
    batch = FakeBatch(
        MemoryController(config), SimulatedProbe(config.memory_budget_bytes, config.pressure_trace), max_rows
    )
    for i in range(iterations):
        batch.reqs += arrivals.get(i, [])
        batch.iterate(i)
    return batch


def _steady(iterations: int, every: int) -> dict[int, list[Req]]:
    """Identical requests arriving at a constant rate."""
    return {i: [Req(f"r{i}", 0, i, prompt=40, max_tokens=60)] for i in range(0, iterations, every)}


def _capacity_changes(batch: FakeBatch, warmup: int) -> int:
    caps = [d.capacity for d in batch.decisions[warmup:]]
    return sum(a != b for a, b in zip(caps, caps[1:], strict=False))


def test_steady_workload_capacity_does_not_oscillate() -> None:
    # Demand (60 tokens every 4 iterations: ~15 rows) exceeds what the budget holds (11 rows): memory binds.
    config = ControllerConfig(probe="simulated", memory_budget_bytes=1_600_000)
    batch = _run(config, _steady(2_000, every=4), 2_000, max_rows=32)
    assert _capacity_changes(batch, warmup=200) <= 2
    assert sum(len(d.preempt) for d in batch.decisions[200:]) <= 2
    assert max(batch.peaks) <= config.high_watermark * 1_600_000


def test_next_step_growth_alone_would_oscillate() -> None:
    """Why growth looks ahead: on the next-step prediction alone, capacity grows whenever the oldest row
    leaves (the cache narrows), then preempts when the younger rows have grown back to that width."""
    config = ControllerConfig(probe="simulated", memory_budget_bytes=1_600_000, growth_lookahead_steps=1)
    batch = _run(config, _steady(2_000, every=4), 2_000, max_rows=32)
    assert _capacity_changes(batch, warmup=200) > 10


def test_underloaded_steady_workload_never_preempts() -> None:
    config = ControllerConfig(probe="simulated", memory_budget_bytes=4_000_000)
    batch = _run(config, _steady(1_000, every=10), 1_000, max_rows=32)
    assert not any(d.preempt for d in batch.decisions)
    assert _capacity_changes(batch, warmup=100) == 0


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_never_exceeds_budget_under_scripted_pressure(mode: str) -> None:
    budget = 2_000_000
    trace = (
        PressureEvent(iteration=100, fraction=0.3),
        PressureEvent(iteration=250, fraction=0.5),
        PressureEvent(iteration=400, fraction=0.1),
        PressureEvent(iteration=550, fraction=0.45),
        PressureEvent(iteration=700, fraction=0.0),
    )
    config = ControllerConfig(
        probe="simulated",
        memory_budget_bytes=budget,
        pressure_trace=trace,
        preemption_mode=mode,  # type: ignore[arg-type]
        host_swap_budget_bytes=150 * BPT,
    )
    arrivals = {
        i: [Req(f"r{i}", priority=i % 3, arrival=i, prompt=30 + 7 * (i % 5), max_tokens=50 + 11 * (i % 4))]
        for i in range(0, 800, 3)
    }
    batch = _run(config, arrivals, 3_000, max_rows=24)
    assert max(batch.peaks) <= budget
    assert any(d.preempt for d in batch.decisions), "the trace should force preemptions"
    assert all(r.preemptions <= config.max_preemptions_per_request for r in batch.reqs)
    assert all(r.state == "finished" for r in batch.reqs), "every request finishes once the load stops"
    modes = {p.mode for d in batch.decisions for p in d.preempt}
    assert modes == ({"swap", "recompute"} if mode == "auto" else {mode})

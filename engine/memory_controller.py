"""The memory-driven capacity controller: grow under the low watermark, preempt over the high one.

A pure function of the snapshot, the config and the capacity it set last time: no torch, no Ray, no clock.

Predicted peak of the next step (bytes), for the batch this decision leaves behind:

    used      = max(reading.used_bytes, reading.engine_bytes)   # never trust one number alone
    width     = max(L, longest admitted candidate)              # left-padded cache: every row is `width` wide
    predicted = used
              - preempted_rows * L * bytes_per_token            # their rows leave the cache
              + kept_rows * (width - L) * bytes_per_token       # running rows left-padded to a longer arrival
              + admitted * width * bytes_per_token              # each arrival's KV, padded to the batch width
              + rows_after * bytes_per_token                    # the step appends one column to every row
              + rows_after * step_bytes_per_row                 # activation + logits peak of that step

`used` counts the prefilled pool too, so an arrival from the pool is counted twice: that is the true peak
while its KV is copied into the batch, before the pool entry is freed. `engine_bytes` should be what the
engine holds resident (weights, cache, pool), not a step peak: the controller adds the next step's peak.

Reclaimable bytes (the prefix cache, `snapshot.reclaimable_bytes`) are counted in `used` but are the first
thing given back: every rule below runs on `used - reclaimable`, so no row is preempted and no admission
refused while evicting cached prefixes suffices, and the decision's `evict_bytes` says how much of the cache
to drop before the step so that the real peak stays under the high watermark:

    evict_bytes = clamp(predicted + reclaimable - high, 0, reclaimable)

Capacity has hysteresis: it grows (one row per candidate admitted beyond it) only while the predicted peak
is under the low watermark *and* the grown batch's sustained peak stays under the high one; it shrinks only
when the prediction crosses the high watermark (preempting rows). Between the two it holds: freed rows are
refilled while the prediction stays under the high watermark, but a preempted row is not re-admitted until
memory falls under the low one.

Sustained peak of a capacity of `rows`: every row kept full (finished rows get refilled), every row as wide
as the widest row will get, `max(L + 1, length + min(remaining, growth_lookahead_steps))` over running rows
and the arrival (an arrival's unknown `remaining` counts as 1):

    sustained = used - (kept_rows + preempted_rows) * L * bytes_per_token
              + rows * (widest * bytes_per_token + step_bytes_per_row)

It exists because the left-padded cache is as wide as its longest row: when the oldest row leaves, the
width drops and the next-step prediction looks roomy, but the younger rows soon grow back to that width.
Growing on the next-step prediction alone makes capacity cycle (grow, then preempt a few dozen steps later)
on a perfectly steady workload.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from autoscaler.probes.registry import NO_PROBE
from configs.controller import ControllerConfig
from engine.capacity import (
    CapacityController,
    CapacityDecision,
    CapacitySnapshot,
    FixedCapacityController,
    Preemption,
    QueuedInfo,
    RowInfo,
    by_urgency,
)
from engine.preemption import PREEMPTION_MODES, ModeChooser, by_yield_order, may_preempt, outranks


def predicted_peak_bytes(
    snapshot: CapacitySnapshot,
    used_bytes: int,
    kept_rows: int,
    preempted_rows: int,
    admitted_lengths: Sequence[int],
) -> int:
    """Peak device bytes during the next step; the rule is in this module's docstring."""
    s = snapshot
    length = s.batch_length
    width = max([length, *admitted_lengths])
    rows_after = kept_rows + len(admitted_lengths)
    cache_delta = (
        -preempted_rows * length + kept_rows * (width - length) + len(admitted_lengths) * width + rows_after
    )
    return used_bytes + cache_delta * s.bytes_per_token + rows_after * s.step_bytes_per_row


def sustained_peak_bytes(
    snapshot: CapacitySnapshot,
    used_bytes: int,
    kept: Sequence[RowInfo],
    preempted_rows: int,
    admitted: Sequence[QueuedInfo],
    horizon: int,
) -> int:
    """The step peak of this many rows kept full, each as wide as the batch gets within `horizon` steps."""
    s = snapshot

    def final_width(length: int, remaining: int) -> int:
        return length + max(1, min(remaining, horizon))  # remaining 0 = unknown: at least the next step

    widths = [s.batch_length + 1]
    widths += [final_width(r.length, r.remaining) for r in kept]
    widths += [final_width(q.length, q.remaining) for q in admitted]
    rows = len(kept) + len(admitted)
    outside_cache = used_bytes - (len(kept) + preempted_rows) * s.batch_length * s.bytes_per_token
    sustained = outside_cache + rows * (max(widths) * s.bytes_per_token + s.step_bytes_per_row)
    return max(
        sustained,
        predicted_peak_bytes(s, used_bytes, len(kept), preempted_rows, [q.length for q in admitted]),
    )


@dataclass
class _Plan:
    """This iteration's tentative batch. Built fresh by every decision, so nothing leaks between iterations."""

    snapshot: CapacitySnapshot
    used: int
    total: int
    host_used: int  # host bytes holding swapped KV, this decision's swaps included
    kept: list[RowInfo]
    admitted: list[QueuedInfo] = field(default_factory=list)
    preempted: list[Preemption] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.kept) + len(self.admitted)

    def peak(self, admit: Sequence[QueuedInfo] = (), drop: Sequence[RowInfo] = ()) -> int:
        """Predicted peak of this plan, or of this plan with `admit` joining and `drop` preempted."""
        return predicted_peak_bytes(
            self.snapshot,
            self.used,
            kept_rows=len(self.kept) - len(drop),
            preempted_rows=len(self.preempted) + len(drop),
            admitted_lengths=[q.length for q in (*self.admitted, *admit)],
        )

    def sustained(self, admit: Sequence[QueuedInfo], horizon: int) -> int:
        """Sustained peak of this plan with `admit` joining (see sustained_peak_bytes)."""
        return sustained_peak_bytes(
            self.snapshot, self.used, self.kept, len(self.preempted), [*self.admitted, *admit], horizon
        )

    def preempt(self, row: RowInfo, choose_mode: ModeChooser, host_budget: int) -> None:
        row_bytes = row.length * self.snapshot.bytes_per_token
        mode = choose_mode(row_bytes, self.host_used, host_budget)
        if mode == "swap":
            self.host_used += row_bytes
        self.kept.remove(row)
        self.preempted.append(Preemption(row.request_id, mode))

    def admit(self, candidate: QueuedInfo) -> None:
        self.admitted.append(candidate)


def decide_capacity(
    snapshot: CapacitySnapshot, config: ControllerConfig, capacity: int | None = None
) -> CapacityDecision:
    """One decision. `capacity` is what the previous decision set (None on the first iteration).

    1. Predicted peak over the high watermark: preempt rows in yield order until it is not (never the last
       row, never a request at its preemption cap); capacity becomes the rows left; admit nothing.
    2. Otherwise admit candidates, most urgent first: into free rows under `capacity` while the peak stays
       under the high watermark; beyond `capacity` (growing it by one each) only while the peak before the
       admission is under the low watermark and the sustained peak after it under the high one; else by
       displacing less urgent rows across `min_priority_gap`. The first candidate that cannot join stops
       admission (no overtaking, so a big request is not starved by a stream of small ones).
    """
    reading = snapshot.memory
    if reading is None:
        raise ValueError("the memory controller needs snapshot.memory (a probe reading), got None")
    if reading.total_bytes <= 0:
        raise ValueError(f"memory total_bytes must be > 0, got {reading.total_bytes!r}")
    s = snapshot
    high = config.high_watermark * reading.total_bytes
    low = config.low_watermark * reading.total_bytes
    choose_mode = PREEMPTION_MODES[config.preemption_mode]
    reclaimable = max(0, s.reclaimable_bytes)
    plan = _Plan(
        snapshot=s,
        used=max(reading.used_bytes, reading.engine_bytes) - reclaimable,
        total=reading.total_bytes,
        host_used=s.swapped_bytes,
        kept=list(s.rows),
    )
    capacity = min(s.max_rows, max(1, len(s.rows), capacity or 0))

    if plan.peak() > high:
        _shrink(plan, high, config)
        return _decision(plan, max(1, plan.rows), _row_room(s, plan, len(s.candidates)), high)

    ordered = by_urgency(s.candidates)
    for i, candidate in enumerate(ordered):
        if plan.rows < capacity and plan.peak([candidate]) <= high:
            plan.admit(candidate)
        elif (
            plan.rows >= capacity
            and capacity < s.max_rows
            and plan.peak() < low
            and plan.sustained([candidate], config.growth_lookahead_steps) <= high
        ):
            capacity += 1
            plan.admit(candidate)
        elif (victims := _victims_to_seat(plan, candidate, capacity, high, config)) is not None:
            for row in victims:
                plan.preempt(row, choose_mode, config.host_swap_budget_bytes)
            plan.admit(candidate)
        else:
            return _decision(plan, capacity, _row_room(s, plan, len(ordered) - i), high)
    return _decision(plan, capacity, 0, high)


def _shrink(plan: _Plan, high: float, config: ControllerConfig) -> None:
    """Preempt rows in yield order until the predicted peak is under `high` (never the last row, never a
    request at its preemption cap)."""
    choose_mode = PREEMPTION_MODES[config.preemption_mode]
    for row in by_yield_order(plan.snapshot.rows):
        if plan.peak() <= high or len(plan.kept) <= 1:
            break
        if may_preempt(row, config.max_preemptions_per_request):
            plan.preempt(row, choose_mode, config.host_swap_budget_bytes)


def _victims_to_seat(
    plan: _Plan, candidate: QueuedInfo, capacity: int, high: float, config: ControllerConfig
) -> list[RowInfo] | None:
    """The fewest running rows, in yield order, whose preemption seats `candidate` (rows and memory), all
    outranked by it across the priority gap; None if no such set. The candidate replaces them, so the
    batch never empties: displacing even the last row is allowed."""
    eligible = [
        r
        for r in by_yield_order(plan.kept)
        if may_preempt(r, config.max_preemptions_per_request)
        and outranks(candidate.priority, r.priority, config.min_priority_gap)
    ]
    victims: list[RowInfo] = []
    for row in eligible:
        victims.append(row)
        if plan.rows - len(victims) + 1 <= capacity and plan.peak([candidate], victims) <= high:
            return victims
    return None


def _row_room(s: CapacitySnapshot, plan: _Plan, blocked: int) -> int:
    """How many of the `blocked` candidates `max_rows` alone would have let in: refused for memory."""
    return max(0, min(blocked, s.max_rows - plan.rows))


def _decision(plan: _Plan, capacity: int, refused_for_memory: int, high: float) -> CapacityDecision:
    if not plan.kept and not plan.admitted and plan.snapshot.candidates:
        # Progress: an empty batch always takes its most urgent candidate. A prefilled or swapped candidate's
        # KV is already resident (counted in `used`), so embedding it moves memory rather than adding it.
        plan.admit(by_urgency(plan.snapshot.candidates)[0])
        capacity = max(capacity, 1)
        refused_for_memory = max(0, refused_for_memory - 1)
    peak = plan.peak()  # without the reclaimable bytes
    reclaimable = max(0, plan.snapshot.reclaimable_bytes)
    evict = min(reclaimable, max(0, int(peak + reclaimable - high)))
    return CapacityDecision(
        capacity=capacity,
        admit=tuple(q.request_id for q in plan.admitted),
        preempt=tuple(plan.preempted),
        refused_for_memory=refused_for_memory,
        predicted_fraction=(peak + reclaimable - evict) / plan.total,
        prefill_bytes=max(0, int(high - peak)),
        evict_bytes=evict,
    )


class MemoryController:
    """The `CapacityController` driven by memory readings. Its only state is the capacity it last set.

    It reads `self.config` on every call, so thresholds change at runtime: `update(high_watermark=...)` or
    `reconfigure(new_config)`, both atomic (a rejected change leaves the old config in force).
    """

    def __init__(self, config: ControllerConfig) -> None:
        self.config = config
        self.capacity: int | None = None  # set by the first decision

    def reconfigure(self, config: ControllerConfig) -> None:
        """Swap in a new config (e.g. from Serve's `reconfigure(user_config)`); capacity is kept."""
        self.config = config

    def update(self, **changes: object) -> None:
        """Change some knobs at once, validated together; raises pydantic's ValidationError on a bad value."""
        self.config = self.config.updated(**changes)

    def decide(self, snapshot: CapacitySnapshot) -> CapacityDecision:
        decision = decide_capacity(snapshot, self.config, self.capacity)
        self.capacity = decision.capacity
        return decision


def build_controller(config: ControllerConfig) -> CapacityController:
    """FixedCapacityController for probe="fixed" (reads no memory), else the memory-driven controller."""
    return FixedCapacityController() if config.probe == NO_PROBE else MemoryController(config)

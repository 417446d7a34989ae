"""The capacity hook's typed boundary: what the engine tells the controller each iteration, and the answer.

The engine builds a `CapacitySnapshot` before every iteration and asks a `CapacityController` for a
`CapacityDecision`. Controllers are pure functions of the snapshot: no torch, no Ray, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from autoscaler.probes.base import MemoryReading

PreemptMode = Literal["swap", "recompute"]


@dataclass(frozen=True)
class RowInfo:
    """A running row of the decode batch."""

    request_id: str
    priority: int  # lower = more urgent
    arrival: int  # engine-wide arrival order (first come, first served among equals)
    length: int  # tokens held in the cache for this row
    remaining: int  # most tokens it may still generate
    preemptions: int  # times it has been preempted so far


@dataclass(frozen=True)
class QueuedInfo:
    """A request not in the batch: waiting for prefill, prefilled in the pool, or swapped out to host."""

    request_id: str
    priority: int
    arrival: int
    length: int  # tokens its KV will occupy once embedded
    state: Literal["waiting", "prefilled", "swapped"]
    preemptions: int
    remaining: int = 0  # most tokens it may still generate once running (max_tokens left); 0 = unknown


@dataclass(frozen=True)
class CapacitySnapshot:
    """Everything a controller may look at to decide the next iteration."""

    iteration: int
    max_rows: int  # hard ceiling from config (max_batch_size)
    rows: tuple[RowInfo, ...]
    # Requests the policy lets join this iteration, in no particular order (for baton-pd: the prefilled pool
    # and swapped requests; for baton/orca: also the waiting queue; for static: only when the batch drained).
    candidates: tuple[QueuedInfo, ...]
    waiting: int  # requests queued for prefill (not all of them are candidates)
    batch_length: int  # current cache window length L (columns)
    bytes_per_token: int  # cache bytes one token of one row takes, all layers, K and V
    step_bytes_per_row: int  # activation + logits peak of one decode step, per row
    swapped_bytes: int  # host bytes held by swapped-out KV
    memory: MemoryReading | None  # None for the fixed controller (no probe)
    # Device bytes (counted in the reading) the engine can drop at will: the prefix cache. Spent before any row.
    reclaimable_bytes: int = 0


@dataclass(frozen=True)
class Preemption:
    request_id: str
    mode: PreemptMode


@dataclass(frozen=True)
class CapacityDecision:
    """The controller's answer. The engine applies preemptions first, then admissions in the given order."""

    capacity: int  # rows the batch may hold after this iteration's admissions
    admit: tuple[str, ...] = ()  # candidate ids to embed (or prefill) this iteration, in order
    preempt: tuple[Preemption, ...] = ()
    refused_for_memory: int = 0  # candidates that would have fit by rows but not by memory
    predicted_fraction: float | None = field(default=None)  # predicted peak / budget, when known
    # Device bytes the prefill-ahead pool may add this iteration (None: no memory limit). The engine still
    # prefills one prompt when both the batch and the pool are empty, so work always progresses. Counts the
    # reclaimable bytes as free: the engine evicts them for the pool's growth.
    prefill_bytes: int | None = None
    evict_bytes: int = 0  # reclaimable bytes (prefix cache) to drop before this step, so its peak fits


class CapacityController(Protocol):
    """Anything that turns a snapshot into a decision."""

    def decide(self, snapshot: CapacitySnapshot) -> CapacityDecision: ...


def by_urgency(items: tuple[QueuedInfo, ...]) -> list[QueuedInfo]:
    """Most urgent first: lower priority value, then earlier arrival (first come, first served)."""
    return sorted(items, key=lambda q: (q.priority, q.arrival))


@dataclass
class FixedCapacityController:
    """`max_rows` rows, admit the most urgent candidates into free rows, never preempt."""

    def decide(self, snapshot: CapacitySnapshot) -> CapacityDecision:
        free = snapshot.max_rows - len(snapshot.rows)
        admit = tuple(q.request_id for q in by_urgency(snapshot.candidates)[: max(free, 0)])
        return CapacityDecision(capacity=snapshot.max_rows, admit=admit)

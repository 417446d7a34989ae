"""Who yields first when the batch must shrink, and how (swap or recompute). Pure functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from engine.capacity import PreemptMode, RowInfo


def by_yield_order(rows: Iterable[RowInfo]) -> list[RowInfo]:
    """Preemption order: least urgent first (highest priority value), then youngest (latest arrival).

    The exact reverse of `by_urgency`, so among equal priorities the first come is the last to yield (FCFS).
    """
    return sorted(rows, key=lambda r: (-r.priority, -r.arrival))


def may_preempt(row: RowInfo, max_preemptions_per_request: int) -> bool:
    """A request preempted `max_preemptions_per_request` times runs to the end: nothing starves."""
    return row.preemptions < max_preemptions_per_request


def outranks(candidate_priority: int, row_priority: int, min_priority_gap: int) -> bool:
    """A candidate may displace a running row only when strictly more urgent, by at least the gap.

    Equal priorities never displace each other (first come, first served), so a gap of 0 acts like 1.
    """
    gap = row_priority - candidate_priority
    return gap > 0 and gap >= min_priority_gap


# (row KV bytes, host bytes already holding swapped KV incl. this decision's swaps, host swap budget) -> mode
ModeChooser = Callable[[int, int, int], PreemptMode]


def _swap_while_host_room(row_bytes: int, host_used: int, host_budget: int) -> PreemptMode:
    return "swap" if host_used + row_bytes <= host_budget else "recompute"


PREEMPTION_MODES: Mapping[str, ModeChooser] = {
    "swap": lambda _row, _used, _budget: "swap",
    "recompute": lambda _row, _used, _budget: "recompute",
    "auto": _swap_while_host_room,
}

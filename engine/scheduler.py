"""Batching policies (design.md 3.3) and the queues they coordinate.

A policy is data, not code paths: which requests may join this iteration, how they join, and whether
finished rows leave at once. The engine's step reads these flags; one registry maps names to policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autoscaler.capacity import QueuedInfo
from engine.kv_cache import RowKV
from engine.request import Request, RequestState

JoinMode = Literal["in_batch", "prefill_on_admit", "from_pool"]


@dataclass(frozen=True)
class Policy:
    name: str
    join: JoinMode  # in_batch: the prompt rides in the batch forward (padded); else prefilled alone
    retire_at_once: bool  # finished rows leave the batch at once (False: run to completion)
    prefill_ahead: bool  # prefill waiting prompts into the pool within a token budget, ahead of need


POLICIES: dict[str, Policy] = {
    p.name: p
    for p in (
        Policy("static", join="in_batch", retire_at_once=False, prefill_ahead=False),
        Policy("orca", join="in_batch", retire_at_once=True, prefill_ahead=False),
        Policy("baton", join="prefill_on_admit", retire_at_once=True, prefill_ahead=False),
        Policy("baton-pd", join="from_pool", retire_at_once=True, prefill_ahead=True),
    )
}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]


class RequestQueues:
    """Requests outside the batch: waiting (for prefill), prefilled (the pool), swapped (KV on host)."""

    def __init__(self) -> None:
        self.waiting: dict[str, Request] = {}
        self.pool: dict[str, RowKV] = {}
        self.swapped: dict[str, RowKV] = {}

    def waiting_by_urgency(self) -> list[Request]:
        return sorted(self.waiting.values(), key=lambda r: (r.priority, r.arrival))

    def held_bytes(self) -> tuple[int, int]:
        """(device bytes of the prefilled pool, host bytes of swapped KV)."""
        return sum(kv.nbytes() for kv in self.pool.values()), sum(kv.nbytes() for kv in self.swapped.values())

    def discard(self, request_id: str) -> None:
        self.waiting.pop(request_id, None)
        self.pool.pop(request_id, None)
        self.swapped.pop(request_id, None)


def queued_info(req: Request) -> QueuedInfo:
    state = {RequestState.WAITING: "waiting", RequestState.PREFILLED: "prefilled",
             RequestState.SWAPPED: "swapped"}[req.state]
    # Once embedded, a row caches every token but the newest (which is the next decode input).
    return QueuedInfo(request_id=req.request_id, priority=req.priority, arrival=req.arrival,
                      length=len(req.all_token_ids) - (0 if state == "waiting" else 1),
                      state=state, preemptions=req.preemptions, remaining=req.remaining)  # type: ignore[arg-type]


def admission_candidates(policy: Policy, requests: dict[str, Request], queues: RequestQueues,
                         batch_rows: int) -> tuple[QueuedInfo, ...]:
    """Who may join the batch this iteration under `policy`."""
    if policy.name == "static" and batch_rows:
        return ()  # run to completion: a new batch forms only once the old one has drained
    ids = list(queues.swapped) + list(queues.pool)
    if policy.join != "from_pool":
        ids += list(queues.waiting)
    return tuple(queued_info(requests[i]) for i in ids)

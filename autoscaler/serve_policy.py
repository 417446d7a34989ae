"""The Ray Serve replica autoscaling policy for BATON: a pure function of Serve's `AutoscalingContext`.

Each replica reports its engine's signals through `EngineServer.record_autoscaling_stats()` (deployment `BatonEngine`) (keys below);
Serve aggregates them per replica over `look_back_period_s` and hands them to the policy as
`ctx.aggregated_metrics`. The policy turns them into a desired replica count:

* demand = rows running + waiting + swapped on every replica + requests queued at handles (not yet on a
  replica); rows = each replica's `max_batch_size`.
* scale up to ceil(demand / (target_utilisation x rows)); scale down only to a count the demand fills at
  most `downscale_utilisation` (hysteresis, so the count does not flap around one threshold);
* one more replica than now, whatever the demand, when a replica is memory-saturated while work waits,
  when preemptions are frequent, or when the time to first token breaks its SLO; never fewer then;
* before any replica has reported, Ray's own queue-length rule on `total_num_requests`;
* always within `capacity_adjusted_min_replicas..capacity_adjusted_max_replicas`.

Delays and factors are Ray's: in Ray 2.60 Serve wraps every custom policy (`_apply_autoscaling_config` in
ray/serve/autoscaling_policy.py) so the decision only takes effect after `upscale_delay_s` /
`downscale_delay_s` of agreeing decisions, scaled by `upscaling_factor` / `downscaling_factor`.

Wire it in serve_config.yaml (`autoscaling_config.policy`):
    policy_function: autoscaler.serve_policy:BatonReplicaPolicy     # knobs via policy_kwargs
    policy_kwargs: {target_utilisation: 0.8}
or `autoscaler.serve_policy:baton_replica_policy` (default knobs). Remove `policy` to get Ray's default
(`ray.serve.autoscaling_policy:replica_queue_length_autoscaling_policy`).

No clock, no I/O: the same context always gives the same answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ray.serve.config import AutoscalingContext

from configs.serve import ReplicaPolicyConfig

# The keys an engine replica reports from `record_autoscaling_stats()` (deployments/metrics.py).
STAT_RUNNING = "baton_running"
STAT_WAITING = "baton_waiting"
STAT_SWAPPED = "baton_swapped"
STAT_CAPACITY = "baton_capacity"
STAT_MAX_BATCH = "baton_max_batch_size"
STAT_MEMORY = "baton_memory_used_fraction"
STAT_PREEMPTION_RATE = "baton_preemptions_per_s"
STAT_TTFT = "baton_ttft_s"


@dataclass(frozen=True)
class ReplicaSignals:
    """One replica's signals, averaged over the look-back window."""

    running: float
    waiting: float
    swapped: float
    max_batch_size: float
    memory_used_fraction: float
    preemptions_per_s: float
    ttft_s: float

    @property
    def demand(self) -> float:
        return self.running + self.waiting + self.swapped


def replica_signals(aggregated: Mapping[str, Mapping[Any, float]] | None) -> list[ReplicaSignals]:
    """Per-replica signals from `ctx.aggregated_metrics` ({metric: {replica_id: value}}); replicas that
    have not reported the full set yet are left out."""
    if not aggregated or STAT_MAX_BATCH not in aggregated:
        return []
    out = []
    for replica in aggregated[STAT_MAX_BATCH]:

        def get(key: str, replica: Any = replica) -> float:
            return float(aggregated.get(key, {}).get(replica, 0.0))

        if get(STAT_MAX_BATCH) <= 0:
            continue
        out.append(
            ReplicaSignals(
                running=get(STAT_RUNNING),
                waiting=get(STAT_WAITING),
                swapped=get(STAT_SWAPPED),
                max_batch_size=get(STAT_MAX_BATCH),
                memory_used_fraction=get(STAT_MEMORY),
                preemptions_per_s=get(STAT_PREEMPTION_RATE),
                ttft_s=get(STAT_TTFT),
            )
        )
    return out


def pressure_reason(signals: list[ReplicaSignals], config: ReplicaPolicyConfig) -> str | None:
    """Why the replicas need help beyond their row count, or None."""
    if any(s.memory_used_fraction >= config.memory_pressure and s.waiting + s.swapped > 0 for s in signals):
        return "memory"
    if sum(s.preemptions_per_s for s in signals) / len(signals) >= config.preemptions_per_s:
        return "preemptions"
    if config.ttft_slo_s is not None and max(s.ttft_s for s in signals) > config.ttft_slo_s:
        return "ttft"
    return None


def decide_replicas(ctx: AutoscalingContext, config: ReplicaPolicyConfig) -> tuple[int, dict[str, Any]]:
    """The desired replica count and the policy state (diagnostics only: the reason and the demand)."""
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    current = ctx.current_num_replicas
    if current == 0:
        # Scaling from zero is Serve's cold-start path; keep its target.
        return _clamp(ctx.target_num_replicas, lo, hi), {"baton_reason": "no-replicas"}

    signals = replica_signals(ctx.aggregated_metrics)
    if not signals:
        target = ctx.config.get_target_ongoing_requests() if ctx.config is not None else 2.0
        desired = math.ceil(ctx.total_num_requests / target) if ctx.total_num_requests > 0 else lo
        return _clamp(desired, lo, hi), {"baton_reason": "no-signals"}

    queued = float(ctx.total_queued_requests or 0.0)
    demand = sum(s.demand for s in signals) + queued
    rows = sum(s.max_batch_size for s in signals) / len(signals)
    up = math.ceil(demand / (config.target_utilisation * rows))
    down = math.ceil(demand / (config.downscale_utilisation * rows))  # 0 when idle (min_replicas decides)
    reason = pressure_reason(signals, config)
    if reason is not None:
        desired, why = max(up, current + 1), reason
    elif up > current:
        desired, why = up, "demand"
    elif down < current:
        desired, why = down, "idle"
    else:
        desired, why = current, "steady"
    return _clamp(desired, lo, hi), {"baton_reason": why, "baton_demand": demand}


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, n))


_DEFAULT_CONFIG = ReplicaPolicyConfig()


def baton_replica_policy(ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
    """The policy with default knobs (a plain function: Serve passes no kwargs to functions)."""
    return decide_replicas(ctx, _DEFAULT_CONFIG)


class BatonReplicaPolicy:
    """The policy with knobs: Serve instantiates it once with `policy_kwargs` (validated by
    `ReplicaPolicyConfig`, so a typo fails the deploy) and calls it each control-loop tick."""

    def __init__(self, **policy_kwargs: Any) -> None:
        self.config = ReplicaPolicyConfig.model_validate(policy_kwargs)

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        return decide_replicas(ctx, self.config)

"""The BATON replica autoscaling policy as a pure function of Serve's AutoscalingContext (table-driven),
and composed with the delay logic Ray 2.60 wraps around every custom policy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from autoscaler.serve_policy import (
    STAT_MAX_BATCH,
    STAT_MEMORY,
    STAT_PREEMPTION_RATE,
    STAT_RUNNING,
    STAT_SWAPPED,
    STAT_TTFT,
    STAT_WAITING,
    BatonReplicaPolicy,
    baton_replica_policy,
    decide_replicas,
)
from configs.serve import ReplicaPolicyConfig


@dataclass
class R:
    """One replica's averaged signals (max_batch_size 16 unless given)."""

    running: float = 0
    waiting: float = 0
    swapped: float = 0
    memory: float = 0.2
    preempt: float = 0.0
    ttft: float = 0.1
    rows: float = 16


@dataclass
class Case:
    name: str
    replicas: list[R]
    want: int
    queued: float = 0
    lo: int = 1
    hi: int = 4
    target: int | None = None  # ctx.target_num_replicas (default: len(replicas))
    config: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


def make_ctx(
    replicas: list[R],
    *,
    queued: float = 0,
    lo: int = 1,
    hi: int = 4,
    target: int | None = None,
    total_requests: float = 0,
    config: AutoscalingConfig | None = None,
    policy_state: dict[str, Any] | None = None,
) -> AutoscalingContext:
    ids = [f"replica-{i}" for i in range(len(replicas))]
    metrics = {
        STAT_RUNNING: {i: r.running for i, r in zip(ids, replicas, strict=True)},
        STAT_WAITING: {i: r.waiting for i, r in zip(ids, replicas, strict=True)},
        STAT_SWAPPED: {i: r.swapped for i, r in zip(ids, replicas, strict=True)},
        STAT_MEMORY: {i: r.memory for i, r in zip(ids, replicas, strict=True)},
        STAT_PREEMPTION_RATE: {i: r.preempt for i, r in zip(ids, replicas, strict=True)},
        STAT_TTFT: {i: r.ttft for i, r in zip(ids, replicas, strict=True)},
        STAT_MAX_BATCH: {i: r.rows for i, r in zip(ids, replicas, strict=True)},
    }
    n = len(replicas)
    return AutoscalingContext(
        deployment_id=DeploymentID(name="BatonEngine", app_name="baton"),
        deployment_name="BatonEngine",
        app_name="baton",
        current_num_replicas=n,
        target_num_replicas=n if target is None else target,
        running_replicas=ids,  # type: ignore[arg-type]
        total_num_requests=total_requests,
        total_queued_requests=queued,
        aggregated_metrics=metrics if replicas else {},  # type: ignore[arg-type]
        raw_metrics={},
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
        policy_state=policy_state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=0.0,
        config=config or AutoscalingConfig(min_replicas=lo, max_replicas=hi),
    )


CASES = [
    Case("idle one replica stays at min", [R()], 1, reason="idle"),
    Case("idle two replicas go down to min", [R(), R()], 1, reason="idle"),
    Case("idle with min 2 stays at 2", [R(), R()], 2, lo=2),
    Case("light load holds", [R(running=8)], 1, reason="steady"),
    Case("at 80% of rows holds", [R(running=12.8)], 1),
    Case("over 80% of rows scales up", [R(running=16, waiting=2)], 2, reason="demand"),
    Case("deep queue asks for several", [R(running=16, waiting=40)], 4, reason="demand"),
    Case("never above max", [R(running=16, waiting=400)], 4),
    Case("handle-queued requests count as demand", [R(running=10)], 2, queued=6),
    Case("swapped rows count as demand", [R(running=12, swapped=4)], 2),
    Case("hysteresis: 2 replicas at 40% stay", [R(running=7), R(running=6)], 2, reason="steady"),
    Case("2 replicas at 25% go to 1", [R(running=4), R(running=4)], 1, reason="idle"),
    Case("4 replicas, demand for 2", [R(running=5), R(running=5), R(running=5), R(running=0)], 2),
    Case("rows come from max_batch_size", [R(running=3, rows=4)], 1),
    Case("small rows overflow sooner", [R(running=4, waiting=2, rows=4)], 2),
    Case(
        "memory pressure with waiting work adds one",
        [R(running=4, waiting=1, memory=0.95)],
        2,
        reason="memory",
    ),
    Case("memory pressure with nothing waiting does not", [R(running=4, memory=0.95)], 1),
    Case(
        "memory pressure blocks a scale-down", [R(running=1, waiting=1, memory=0.95), R()], 3, reason="memory"
    ),
    Case("frequent preemptions add one", [R(running=4, preempt=1.0)], 2, reason="preemptions"),
    Case("rare preemptions do not", [R(running=4, preempt=0.1)], 1),
    Case(
        "ttft over the SLO adds one", [R(running=4, ttft=3.0)], 2, config={"ttft_slo_s": 1.0}, reason="ttft"
    ),
    Case("ttft ignored without an SLO", [R(running=4, ttft=3.0)], 1),
    Case("pressure never beyond max", [R(running=4, preempt=5.0)] * 4, 4),
    Case("min 0: idle may reach 0", [R()], 0, lo=0),
    Case("custom target utilisation", [R(running=9)], 2, config={"target_utilisation": 0.5}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_policy_table(case: Case) -> None:
    ctx = make_ctx(case.replicas, queued=case.queued, lo=case.lo, hi=case.hi, target=case.target)
    n, state = decide_replicas(ctx, ReplicaPolicyConfig(**case.config))
    assert n == case.want, state
    assert case.lo <= n <= case.hi
    if case.reason is not None:
        assert state["baton_reason"] == case.reason


def test_policy_is_pure() -> None:
    ctx = make_ctx([R(running=16, waiting=9), R(running=3)], queued=2)
    first = baton_replica_policy(ctx)
    assert all(baton_replica_policy(ctx) == first for _ in range(5))


def test_no_signals_yet_falls_back_to_ray_queue_length_rule() -> None:
    cfg = AutoscalingConfig(min_replicas=1, max_replicas=5, target_ongoing_requests=4)
    ctx = make_ctx([], total_requests=10, config=cfg, lo=1, hi=5, target=1)
    ctx.current_num_replicas = 2  # running replicas that have not reported custom metrics yet
    n, state = baton_replica_policy(ctx)
    assert (n, state["baton_reason"]) == (3, "no-signals")


def test_no_replicas_keeps_serves_cold_start_target() -> None:
    ctx = make_ctx([], lo=0, hi=3, target=1)
    assert baton_replica_policy(ctx)[0] == 1


def test_class_policy_validates_its_kwargs() -> None:
    policy = BatonReplicaPolicy(target_utilisation=0.5, downscale_utilisation=0.25)
    assert policy(make_ctx([R(running=9)]))[0] == 2
    with pytest.raises(ValueError, match="target_utilisaton"):
        BatonReplicaPolicy(target_utilisaton=0.5)
    with pytest.raises(ValueError, match="downscale_utilisation"):
        BatonReplicaPolicy(target_utilisation=0.5, downscale_utilisation=0.9)


def test_ray_applies_delays_around_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve 2.60 wraps every custom policy with its delay/bounds logic (`_apply_autoscaling_config`): a
    decision takes effect only after upscale_delay_s / downscale_delay_s of agreeing ticks."""
    import ray.serve.autoscaling_policy as rap

    clock = [1000.0]
    monkeypatch.setattr(rap.time, "time", lambda: clock[0])
    wrapped = rap._apply_autoscaling_config(baton_replica_policy)
    cfg = AutoscalingConfig(min_replicas=1, max_replicas=3, upscale_delay_s=5, downscale_delay_s=20)
    state: dict[str, Any] = {}
    busy, idle = [R(running=16, waiting=4)], [R(), R()]

    def tick(replicas: list[R], target: int, dt: float) -> int:
        nonlocal state
        clock[0] += dt
        n, state = wrapped(make_ctx(replicas, config=cfg, lo=1, hi=3, target=target, policy_state=state))
        return n

    # (replicas, current target, seconds since the previous tick, expected decision)
    timeline = [
        (busy, 1, 0, 1),  # wants 2, the upscale delay starts
        (busy, 1, 3, 1),
        (busy, 1, 3, 2),  # 6 s >= 5 s: up
        (idle, 2, 1, 2),  # wants 1, the downscale delay starts
        (idle, 2, 10, 2),
        (busy[:1] + [R(running=16)], 2, 1, 2),  # load again: the downscale countdown resets
        (idle, 2, 1, 2),
        (idle, 2, 19, 2),
        (idle, 2, 2, 1),  # 21 s of agreeing idle ticks: down
    ]
    got = [tick(replicas, target, dt) for replicas, target, dt, _ in timeline]
    assert got == [want for *_, want in timeline]

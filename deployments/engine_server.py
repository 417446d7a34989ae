"""`EngineServer`: the engine deployment. One BATON engine per replica, no HTTP.

The ingress (deployments/server.py) reaches it only through a Serve handle: `describe()` once, for the
tokenizer and limits it validates against, then one streaming `generate(job)` per request, which yields the
engine's `RequestOutput` deltas. Other Ray apps may call it the same way. The replica scales on its engine's
own signals (`record_autoscaling_stats`), takes the live knobs of its `user_config`, and fails Serve's health
check when its engine loop has died, so Serve replaces it; the ingress then continues its requests on
another replica (deployments/remote_engine.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray import serve

from configs import EngineConfig
from configs.serve import ControllerKnobs
from deployments import thread_policy
from deployments.front import EngineFront, FrontFactory, build_engine_front
from deployments.metrics import AutoscalingSignals, MetricsPoller, ServerMetrics
from engine.choices import Resume
from engine.request import RequestOutput, SamplingParams

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class EngineJob:
    """One request as the engine deployment takes it: token ids, already validated by the ingress; its `n`
    choices go to the engine together (engine/choices.py), their outputs come back tagged with their index.

    `resume`: after a replica died, the choices still to run, each with the output tokens the client has
    already received of it; the engine continues each after them (`BatonEngine.make_choices`). None: a
    fresh request, every choice from the start."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    resume: dict[int, tuple[int, ...]] | None = None
    n: int = 1

    @property
    def choices(self) -> list[int]:
        """The indices of the choices this job runs."""
        return sorted(self.resume) if self.resume is not None else list(range(self.n))

    @property
    def resume_token_ids(self) -> tuple[int, ...]:
        """Choice 0's tokens to continue after (a plain request's)."""
        return self.resume.get(0, ()) if self.resume is not None else ()

    def resumed(self, received: Mapping[int, Sequence[int]], finished: Collection[int] = ()) -> EngineJob:
        """This job continued on another replica: every choice not `finished`, after the tokens it had and
        those `received` since."""
        had = self.resume or {}
        return replace(self, resume={i: (*had.get(i, ()), *received.get(i, ())) for i in self.choices
                                     if i not in finished})

    def front_resume(self) -> Resume:
        """`resume` as the front's `submit` takes it."""
        return self.resume if self.resume is not None else ()


@dataclass(frozen=True)
class EngineDescription:
    """What the ingress needs to know of the engine: its config, limits and tokenizer."""

    config: EngineConfig
    max_model_len: int
    vocab_size: int
    tokenizer: Any  # the Hugging Face tokenizer (picklable), with its chat template


@dataclass(frozen=True)
class EngineReplicaStatus:
    """One engine replica's live view (for the ingress's /stats)."""

    replica: str
    node_id: str
    pid: int
    healthy: bool
    metrics: dict[str, float]
    config: dict[str, Any]


class EngineUnavailable(RuntimeError):
    """This replica cannot serve the request (its engine loop has died or is stopping): another can.
    `at_submit`: the loop was already dead when the request arrived (it did not die under this request)."""

    def __init__(self, message: str, at_submit: bool = False) -> None:
        super().__init__(message)
        self.at_submit = at_submit

    def __reduce__(self) -> tuple[Any, ...]:  # crosses Ray's process boundary with its flag
        return (EngineUnavailable, (str(self), self.at_submit))


@serve.deployment(
    name="BatonEngine",
    # The engine orders its own queue by priority, so the handle sends it every request it holds; the
    # ingress's admission limit (ServerConfig.max_pending_requests) is what bounds them.
    max_ongoing_requests=64,
    max_queued_requests=-1,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
class EngineServer:
    """One replica: one engine front, streamed to the ingress through its handle."""

    def __init__(self, engine_config: EngineConfig, front_factory: FrontFactory | None = None,
                 metrics_interval_s: float = 1.0, model_name: str = "") -> None:
        self._replica = serve.get_replica_context().replica_id.unique_id
        if engine_config.batch_serving_threads:  # first: the compute thread and the threads it makes opt out
            thread_policy.batch_threads()
        self._front: EngineFront = (front_factory or build_engine_front)(engine_config)
        self._front.start()
        self._signals = AutoscalingSignals()
        self._poller = MetricsPoller(self._front.metrics, ServerMetrics(model_name or engine_config.model),
                                     metrics_interval_s)
        self._poller.start()

    async def describe(self) -> EngineDescription:
        core = self._front.engine
        return EngineDescription(self._front.config, core.max_model_len, core.vocab_size, core.tokenizer)

    async def ready(self) -> bool:
        """True while this replica's engine loop serves (the ingress's /health asks)."""
        return self._front.is_healthy()

    async def generate(self, job: EngineJob) -> AsyncIterator[RequestOutput]:
        """The request's deltas (call with `handle.options(stream=True)`), every choice's, tagged with its
        index; it ends after each choice's `finished` one. Raises
        `EngineUnavailable` when this replica cannot serve it; cancelling the call aborts the request."""
        t0 = time.monotonic()
        try:
            stream = self._front.submit(job.request_id, prompt_token_ids=list(job.prompt_token_ids),
                                        sampling_params=job.params, priority=job.priority,
                                        resume_token_ids=job.front_resume(), n=job.n)
        except RuntimeError as e:  # the loop has stopped: not this request's fault
            raise EngineUnavailable(f"replica {self._replica}: {e}", at_submit=True) from None
        first = True
        async with aclosing(stream):  # leaving early (cancelled by the ingress) aborts it in the engine
            async for out in stream:
                if out.finished and out.finish_reason == "error" and not self._front.is_healthy():
                    raise EngineUnavailable(f"replica {self._replica}: the engine loop died: {out.error}")
                if first and out.new_token_ids:
                    first = False
                    self._signals.observe_ttft(time.monotonic() - t0)
                yield out  # the stream ends after the last choice's final output

    async def status(self) -> EngineReplicaStatus:
        return EngineReplicaStatus(self._replica, ray.get_runtime_context().get_node_id(), os.getpid(),
                                   self._front.is_healthy(), self._front.metrics(),
                                   self._front.config.model_dump(mode="json"))

    # -- Serve hooks -----------------------------------------------------------------------------------

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply the live knobs of `user_config` (ControllerKnobs: every field marked live; unknown keys fail)."""
        updates = ControllerKnobs.model_validate(user_config or {}).updates()
        if updates:
            self._front.update_controller(**updates)
            log.info("BATON controller reconfigured: %s", updates)

    def check_health(self) -> None:
        if not self._front.is_healthy():
            raise RuntimeError("the BATON engine loop has died")

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Signals for autoscaler/serve_policy.py: queue depth, rows, memory, preemption rate, TTFT."""
        return self._signals.report(self._front.metrics())

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown; a replica that failed in __init__ may lack the fields.
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.stop()
        front = getattr(self, "_front", None)
        if front is not None:
            front.shutdown()

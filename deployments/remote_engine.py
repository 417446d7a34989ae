"""The ingress's engine: the engine deployment behind its Serve handle, with failover.

`RemoteEngine` is the `GenerationBackend` that `OpenAIServing` runs on in the ingress. It validates a
request against the engine's limits (the same pure checks the engine runs, so a bad request is a 400 before
anything is streamed) and starts one streaming `generate` call on an engine replica.

`FailoverStream` is that request's stream. When the replica dies under it (the process is killed, the node
is lost, the engine loop dies), it submits the request again on another replica, as a continuation: the
same request id (so the same derived seed), the same prompt and parameters, and the tokens the client has
already received as `resume_token_ids`. The engine re-prefills prompt + those tokens and draws the next
token at the same position of the same seed stream, so greedy and seeded requests continue token for token
as if nothing had happened: nothing lost, nothing repeated. With no other replica up it keeps trying until
Serve's replacement serves, for up to `failover_timeout_s` after the failure; only then does the stream end
with an error (a 503, or an error event on a stream that is already open).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import cast

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from configs import EngineConfig
from configs.errors import FieldError
from deployments import errors
from deployments.engine_server import EngineDescription, EngineJob, EngineUnavailable
from engine.choices import Resume, choices_to_run
from engine.request import RequestOutput, SamplingParams, check_token_ids

log = logging.getLogger("ray.serve")

# What a lost replica looks like from the caller's side of a handle.
_REPLICA_LOST = (ActorDiedError, ActorUnavailableError, RayActorError, ReplicaUnavailableError,
                 DeploymentUnavailableError, EngineUnavailable)


def _cause(e: BaseException) -> BaseException:
    return getattr(e, "cause", None) or e


def _refused_at_submit(e: BaseException) -> bool:
    """A replica whose engine loop had already died refused the request: it did not die under it."""
    cause = _cause(e)
    return isinstance(cause, EngineUnavailable) and cause.at_submit


def replica_lost(e: BaseException) -> bool:
    """Whether `e` means the replica could not serve (another may), not that the request is bad. An
    exception raised inside the replica arrives as Ray's task error, an instance of its cause's class too."""
    return isinstance(e, _REPLICA_LOST) or isinstance(getattr(e, "cause", None), _REPLICA_LOST)


class FailoverStream:
    """One request's outputs from the engine deployment, continued on another replica when its replica dies.

    Like the engine front's streams: iterate it for `RequestOutput` deltas (the last is `finished`); closing
    it, cancelling the task that reads it, or dropping it cancels the call, which aborts the request on the
    replica; `on_close` runs exactly once, however it ends."""

    def __init__(self, handle: DeploymentHandle, job: EngineJob, on_close: Callable[[], None],
                 failover_timeout_s: float, max_failovers: int, retry_interval_s: float = 0.5,
                 on_failover: Callable[[], None] = lambda: None) -> None:
        self._handle = handle
        self._job = job
        self._on_close = on_close
        self._failover_timeout_s = failover_timeout_s
        self._max_failovers = max_failovers
        self._retry_interval_s = retry_interval_s
        self._on_failover = on_failover
        self._closed = False
        self._response = self._call(job)  # queued now, as the local front queues on submit
        self._outputs = self._run()

    def __aiter__(self) -> AsyncGenerator[RequestOutput, None]:
        return self._outputs

    async def aclose(self) -> None:
        await self._outputs.aclose()
        self._finish()

    def _call(self, job: EngineJob) -> DeploymentResponseGenerator:
        return cast(DeploymentResponseGenerator, self._handle.options(stream=True).generate.remote(job))

    async def _run(self) -> AsyncGenerator[RequestOutput, None]:
        # By choice: output tokens the client has been given, and the choices it has seen finish (a
        # continuation runs only the others, each after its own tokens).
        received: dict[int, list[int]] = {}
        finished: set[int] = set()
        choices = set(self._job.choices)
        deadline: float | None = None  # set while recovering from a lost replica
        suspicions = 0  # replicas that died while this request was on them without making progress
        try:
            while True:
                progressed = False
                try:
                    async for out in self._outputs_until(deadline):
                        received.setdefault(out.index, []).extend(out.new_token_ids)
                        deadline, progressed = None, True
                        if out.finished:
                            finished.add(out.index)
                        if finished >= choices:
                            self._finish()  # the slot is free once the final output is handed over
                            yield out
                            return
                        yield out
                    reason, refused = "the replica ended the stream without a final output", False
                except Exception as e:  # noqa: BLE001 - sorted below: a lost replica, or a real failure
                    if not (replica_lost(e) or isinstance(e, TimeoutError)):
                        raise self._refusal(e) from None
                    reason, refused = f"{type(e).__name__}: {e}".splitlines()[0][:300], _refused_at_submit(e)
                self._response.cancel()
                deadline = deadline or time.monotonic() + self._failover_timeout_s
                suspicions += not (progressed or refused)
                self._check_retry(suspicions, deadline, reason)
                log.warning("request %s: engine replica lost after %d tokens (%s); continuing on another",
                            self._job.request_id, sum(map(len, received.values())), reason)
                await self._before_retry(progressed, suspicions, deadline)
                self._on_failover()
                self._response = self._call(self._job.resumed(received, finished))
        finally:
            self._finish()

    def _refusal(self, e: Exception) -> errors.OpenAIError:
        """The error for a request the engine replica refused or failed (not a lost replica)."""
        cause = _cause(e)
        if isinstance(cause, FieldError):  # the engine's own validation (another ingress holds the id, ...)
            if cause.param == "request_id":
                return errors.request_id_in_use(self._job.request_id)
            return errors.from_value_error(cause)
        log.error("request %s failed on the engine: %r", self._job.request_id, e)
        return errors.engine_failed(f"the engine failed this request: {type(cause).__name__}")

    def _check_retry(self, suspicions: int, deadline: float, reason: str) -> None:
        """Give up (a 503) when the request may be what kills replicas, or when time is up."""
        if suspicions > self._max_failovers:
            raise errors.engine_unavailable(
                f"the engine replicas serving this request died {suspicions} times before it made progress; "
                f"it is not retried again ({reason})"
            )
        if time.monotonic() >= deadline:
            raise errors.engine_unavailable(
                f"no engine replica could continue this request within {self._failover_timeout_s:g} s "
                f"after its replica was lost ({reason})"
            )

    async def _before_retry(self, progressed: bool, suspicions: int, deadline: float) -> None:
        """A request that was making progress retries at once: it was a bystander. One that was not may be
        what killed the replica (a query of death): it waits until a replica serves, then backs off
        (0.5 s, 1 s, 2 s, ...), so the bystanders reach that replica first and make progress there; a
        request that keeps killing replicas before it makes progress is then the only one counted."""
        if progressed:
            await asyncio.sleep(0.1)
            return
        while time.monotonic() < deadline:
            try:
                if await asyncio.wait_for(self._handle.ready.remote(), 1.0):
                    break
            except Exception:  # noqa: BLE001 - timed out, or asked a replica that is gone: ask again
                pass
            await asyncio.sleep(self._retry_interval_s)
        await asyncio.sleep(self._retry_interval_s * 2 ** max(0, suspicions - 1))

    async def _outputs_until(self, deadline: float | None) -> AsyncGenerator[RequestOutput, None]:
        """The current call's outputs; while recovering, the first must come before `deadline` (a replica
        that was not replaced in time raises TimeoutError)."""
        it = self._response.__aiter__()
        while True:
            try:
                if deadline is None:
                    out = await it.__anext__()
                else:
                    out = await asyncio.wait_for(it.__anext__(), max(0.0, deadline - time.monotonic()))
                    deadline = None
            except StopAsyncIteration:
                return
            yield out

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._response.cancel()  # a no-op once the call has ended
        self._on_close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):  # dropped unread: release what it holds
            self._finish()


class RemoteEngine:
    """The engine deployment as a `GenerationBackend` (deployments/front.py) for the ingress's serving."""

    def __init__(self, handle: DeploymentHandle, description: EngineDescription, failover_timeout_s: float,
                 max_failovers: int) -> None:
        self._handle = handle
        self._description = description
        self._failover_timeout_s = failover_timeout_s
        self._max_failovers = max_failovers
        self._open: set[str] = set()  # ids of the requests this ingress replica is serving
        self.failovers = 0  # continuations submitted after an engine replica was lost

    @property
    def engine(self) -> EngineDescription:
        return self._description

    @property
    def config(self) -> EngineConfig:
        return self._description.config

    def is_healthy(self) -> bool:
        return True  # a request waits for an engine replica (failover_timeout_s); /health reports them

    @property
    def in_flight(self) -> int:
        return len(self._open)

    def submit(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
               sampling_params: SamplingParams | None = None, priority: int = 0,
               on_close: Callable[[], None] | None = None, resume_token_ids: Resume = (),
               n: int = 1) -> FailoverStream:
        """Check the request as the engine would (FieldError naming the field), then start it on a replica:
        one job for its `n` choices (engine/choices.py)."""
        params = sampling_params or SamplingParams()
        if prompt_token_ids is None:  # OpenAIServing tokenizes in the ingress; the engine gets ids
            raise FieldError("prompt_token_ids", "the ingress submits token ids, not prompt text")
        ids = list(prompt_token_ids)
        d = self._description
        run = choices_to_run(n, resume_token_ids)
        for resumed in run.values():
            check_token_ids(ids, params, resumed, d.vocab_size, d.max_model_len)
        if request_id in self._open:
            raise FieldError("request_id", f"request id {request_id!r} is in use by a running request")
        self._open.add(request_id)

        def closed() -> None:
            self._open.discard(request_id)
            if on_close is not None:
                on_close()

        fresh = all(not t for t in run.values()) and len(run) == n
        resume = None if fresh else {i: tuple(t) for i, t in run.items()}
        job = EngineJob(request_id, ids, params, priority, resume, n)
        return FailoverStream(self._handle, job, closed, self._failover_timeout_s, self._max_failovers,
                              on_failover=self._count)

    def _count(self) -> None:
        self.failovers += 1

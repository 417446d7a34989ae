"""A thread-safe async front over `BatonEngine` for servers.

The engine loop runs in its own daemon thread (never on the caller's event loop). Callers submit requests
and receive an async stream of outputs (engine/streams.py); closing, cancelling or dropping the stream aborts
the request, which leaves the batch within one iteration. Every abort goes through one path, `_abort`.
Validation happens synchronously in `submit`, so a bad request raises `FieldError` (a `ValueError`) before
anything is streamed. Callers talk to the loop thread only through typed messages in its inbox; when the loop
ends, for whatever reason, it fails every open stream, so no consumer waits forever.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from configs import EngineConfig
from engine import cpu_kernel
from engine.choices import Resume
from engine.engine import BatonEngine
from engine.request import Request, RequestOutput, SamplingParams
from engine.streams import OpenStreams, RequestStream, StreamSink
from engine.threads import normal_policy

if TYPE_CHECKING:
    from engine.kv_cache import BatchKVCache

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # after this many failed iterations in a row the loop gives up (unhealthy)
IDLE_WAIT_S = 0.5  # an idle loop wakes at least this often to notice shutdown


# ---- messages into the loop thread ---------------------------------------------------------------------
@dataclass(frozen=True)
class Add:
    """Queue a validated request: its choices (engine/choices.py), together (its stream is already open)."""

    requests: tuple[Request, ...]


@dataclass(frozen=True)
class Abort:
    """End a request with reason `abort`. With `sink`, only while that stream is still the request's own
    (a finished request's id may already belong to a new one). `on_dropped` runs once the engine no
    longer holds the request."""

    request_id: str
    sink: StreamSink | None = None
    on_dropped: Callable[[], object] | None = None


@dataclass(frozen=True)
class Reconfigure:
    """Apply live knobs (already validated against the config of the moment)."""

    knobs: dict[str, Any]


@dataclass(frozen=True)
class Wake:
    """Nothing to do: makes an idle loop look at its stop flag."""


Message = Add | Abort | Reconfigure | Wake


class AsyncBatonEngine:
    """Runs a `BatonEngine` in a background thread and streams outputs to asyncio consumers."""

    def __init__(self, engine: BatonEngine | None = None, *, build: Callable[[], BatonEngine] | None = None) -> None:
        """Give a built `engine`, or `build` to construct it on the loop thread when the front starts.

        Building on the loop thread matters on CPU: libgomp keeps one OpenMP pool per thread that has run a
        parallel region, and with a second pool alive (say the model was loaded on the caller's thread) it
        counts more threads than cores and stops spinning between regions; every step then pays for waking
        its worker. Measured (benchmarks/NOTES.md): the same 16 requests took 46 s on a second thread after
        the main thread had used torch, 34 s with all torch work on one thread.
        """
        if (engine is None) == (build is None):
            raise ValueError("give exactly one of engine or build")
        self._engine, self._build = engine, build
        # A SimpleQueue, not a deque under a lock: `put` is reentrant, so a garbage collector's finalizer
        # (a dropped stream's abort) can post to it from any thread, even one inside `put` or `get`.
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._streams = OpenStreams()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.last_error: BaseException | None = None
        self._dead = False

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncBatonEngine:
        """A front whose engine (model loading included) is built on its loop thread by `start()`."""
        return cls(build=lambda: BatonEngine(config))

    @property
    def engine(self) -> BatonEngine:
        if self._engine is None:
            raise RuntimeError("the engine is built on the loop thread: call start() first")
        return self._engine

    @property
    def config(self) -> EngineConfig:
        return self.engine.config

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread (building the engine there first, if needed) and wait until it serves.
        Raises RuntimeError if the engine cannot be built."""
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._dead = False
            self._streams.reopen()
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ready,), name="baton-engine-loop", daemon=True)
            self._thread.start()
        ready.wait()
        if self._engine is None:
            raise RuntimeError(f"the engine could not be built: {self.last_error}") from self.last_error

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still open end with an `error` output."""
        self._stop.set()
        self._inbox.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout)

    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    # ---- requests ----------------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
               sampling_params: SamplingParams | None = None, priority: int = 0,
               on_close: Callable[[], None] | None = None, resume_token_ids: Resume = (),
               n: int = 1) -> RequestStream:
        """Validate and queue a request; returns its output stream. Must be called from a running event loop.
        `resume_token_ids`: see `BatonEngine.make_request` (a stream continued after a replica died).
        `n`: that many choices (`BatonEngine.make_choices`), queued together; the stream carries each one's
        outputs (`RequestOutput.index`) and ends once every choice has finished.

        `on_close` runs exactly once when the stream is over: its final output was read, or it was closed,
        cancelled or dropped (never when this raises). FieldError for a bad request; RuntimeError when the
        loop is not running."""
        if not self.is_healthy():
            raise RuntimeError("the engine loop is not running" + (f": {self.last_error}" if self.last_error else ""))
        reqs = tuple(self.engine.make_choices(request_id, prompt, prompt_token_ids, sampling_params, priority, n,
                                              resume_token_ids))
        return self._streams.open(request_id, self._abort, on_close, then=lambda: self._inbox.put(Add(reqs)),
                                  choices=tuple(r.index for r in reqs))

    def abort(self, request_id: str, on_dropped: Callable[[], object] | None = None) -> None:
        """Thread-safe; the request leaves the batch before the next iteration. `on_dropped` is called once
        the engine no longer holds it (the id is then free for a new submission)."""
        self._abort(request_id, None, on_dropped)

    def _abort(self, request_id: str, sink: StreamSink | None, on_dropped: Callable[[], object] | None) -> None:
        """The one abort path (streams closed, cancelled or dropped, and `abort`). Takes no lock, so a
        finalizer may call it from any thread."""
        self._inbox.put(Abort(request_id, sink, on_dropped))
        if self._streams.closed:  # the loop has ended and reads no more messages: answer them here
            self._discard_inbox()

    def update_controller(self, **knobs: Any) -> None:
        """Change live knobs (validated now, applied before the next iteration). FieldError on bad ones."""
        self.engine.validate_knobs(knobs)
        self._inbox.put(Reconfigure(dict(knobs)))

    def metrics(self) -> dict[str, float]:
        s = self.engine.stats
        cfg = self.engine.config
        share = cpu_kernel.share_stats()
        return {
            "num_requests_running": float(s.running),
            "num_requests_waiting": float(s.waiting + s.prefilled),
            "num_requests_swapped": float(s.swapped),
            "capacity": float(s.capacity or cfg.max_batch_size),
            "max_batch_size": float(cfg.max_batch_size),
            "preemptions_total": float(s.preemptions),
            "idle_fraction": s.idle_fraction,
            "memory_used_fraction": s.memory_used_fraction,
            "kv_cache_usage": kv_cache_usage(self.engine.cache),
            "admissions_refused_for_memory": float(s.admissions_refused_for_memory),
            "iterations": float(s.iterations),
            "decode_threads": float(self.engine.runner.decode_threads()),
            "thread_switches_total": float(tuner.switches if (tuner := self.engine.runner.tuner) else 0),
            "decode_rows_total": float(s.rows_computed),
            "forward_seconds_total": s.forward_s,
            "iteration_seconds_total": s.total_s,
            "generated_tokens_total": float(s.generated_tokens),
            "prompt_tokens_total": float(s.prefill_tokens),
            "prefix_cache_hit_tokens_total": float(s.prefix_hit_tokens),
            "prefix_cache_query_tokens_total": float(s.prefix_query_tokens),
            "prefix_cache_bytes": float(s.prefix_cache_bytes),
            # the kernels' work-sharing pool: the compute thread's time in its jobs, and waiting for helpers there
            "share_job_seconds_total": share["job_ns"] / 1e9,
            "share_wait_seconds_total": share["wait_ns"] / 1e9,
            "share_stalls_total": float(share["stalls"]),
        }

    # ---- the loop thread ---------------------------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        normal_policy()
        if not self._build_engine(ready):
            return
        reason = "the engine loop stopped"
        try:
            reason = self._serve()
        except BaseException as e:  # noqa: BLE001 - whatever ends the loop, it must end its streams too
            log.exception("the engine loop died")
            self.last_error = e
            reason = f"the engine loop died: {e!r}"
        finally:
            # Unhealthy first, so a consumer woken by the failure below already sees the engine gone.
            self._dead = True
            self._streams.close(reason)
            self._discard_inbox()

    def _build_engine(self, ready: threading.Event) -> bool:
        try:
            if self._engine is None and self._build is not None:
                self._engine = self._build()
        except BaseException as e:  # noqa: BLE001 - reported by start() in the caller's thread
            self.last_error = e
            self._dead = True
            self._streams.close(f"the engine could not be built: {e}")
            return False
        finally:
            ready.set()
        return True

    def _serve(self) -> str:
        """Iterate until stopped; returns why the loop ended."""
        failures = 0
        while not self._stop.is_set():
            self._read_inbox(wait=not self.engine.has_unfinished_requests())
            if self._stop.is_set() or not self.engine.has_unfinished_requests():
                continue
            try:
                outs = self.engine.step(emit=self._deliver)  # first tokens go out before the batch forward
                failures = 0
            except Exception as e:  # a bug or a device fault: fail what was in flight, keep serving
                log.exception("engine iteration failed")
                self.last_error = e
                failures += 1
                outs = self.engine.fail_all(f"engine iteration failed: {e}")
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self._dead = True
                    self._deliver(outs)
                    return f"engine loop stopped after repeated failures: {e}"
            self._deliver(outs)
        return "the engine was shut down"

    def _read_inbox(self, wait: bool) -> None:
        """Handle every queued message; with `wait`, block (up to IDLE_WAIT_S) until one comes."""
        try:
            msg = self._inbox.get(timeout=IDLE_WAIT_S) if wait else self._inbox.get_nowait()
            while True:
                self._handle(msg)
                msg = self._inbox.get_nowait()
        except queue.Empty:
            return

    def _handle(self, msg: Message) -> None:
        match msg:
            case Add(requests=reqs):
                try:
                    self.engine.enqueue_all(reqs)
                except ValueError as e:
                    self._deliver([RequestOutput(r.output_id, [], "", True, "error", error=str(e), index=r.index)
                                   for r in reqs])
            case Abort(request_id=rid, sink=sink, on_dropped=on_dropped):
                if sink is None or self._streams.holds(rid, sink):
                    self.engine.abort_request(rid)
                    self._deliver(self.engine.outputs.drain())
                if on_dropped is not None:
                    _call_safely(on_dropped)
            case Reconfigure(knobs=knobs):
                try:
                    self.engine.reconfigure(**knobs)
                except ValueError:  # valid alone, but not after a change queued before it: keep serving
                    log.exception("live knobs %s rejected", knobs)
            case Wake():
                pass

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for rid in self._streams.deliver(outs):  # nobody can read these any more
            self._abort(rid, None, None)

    def _discard_inbox(self) -> None:
        """After the loop has ended: drop queued messages, answering aborts (the engine holds nothing)."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, Abort) and msg.on_dropped is not None:
                _call_safely(msg.on_dropped)


def _call_safely(callback: Callable[[], object]) -> None:
    """Run a caller's callback on the loop thread; a failing one is the caller's bug, not the loop's end."""
    try:
        callback()
    except Exception:
        log.exception("an abort's on_dropped callback failed")


def kv_cache_usage(cache: BatchKVCache) -> float:
    """Rows' cached tokens over what the preallocated cache holds (0..1); vLLM's `kv_cache_usage_perc`."""
    reserved = cache.reserved_bytes()
    return min(1.0, sum(cache.real) * cache.bytes_per_token / reserved) if reserved else 0.0

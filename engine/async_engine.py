"""A thread-safe async front over `BatonEngine` for servers.

The engine loop runs in its own daemon thread (never on the caller's event loop). Callers submit requests
and receive an async stream of outputs; closing or cancelling the stream aborts the request, which leaves the
batch within one iteration. Validation happens synchronously in `submit`, so a bad request raises
`ValueError` before anything is streamed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from configs import EngineConfig
from engine.engine import BatonEngine
from engine.request import Request, RequestOutput, SamplingParams

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3  # after this many failed iterations in a row the loop gives up (unhealthy)
ACLOSE_POLL_S = 0.5  # how often a closing stream re-checks that the loop is alive while it waits


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RequestStream:
    """Async iterator over one request's `RequestOutput`s; the last one has `finished=True`."""

    def __init__(self, front: AsyncBatonEngine, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._front, self._loop = front, loop
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except asyncio.CancelledError:
            self._abort()
            raise
        if out.finished:
            self._done = True
        return out

    async def aclose(self) -> None:
        """Abort the request and wait (at most one iteration) until the engine has dropped it, so the request
        id is free for a new submission when this returns."""
        if self._done:
            return
        self._done = True
        dropped = self._loop.create_future()
        self._front.abort(self.request_id, on_dropped=lambda: self._loop.call_soon_threadsafe(_resolve, dropped))
        while not dropped.done():
            try:
                await asyncio.wait_for(asyncio.shield(dropped), timeout=ACLOSE_POLL_S)
            except asyncio.TimeoutError:
                if not self._front.is_healthy():  # a dead loop never drains its inbox; nothing left to wait for
                    return

    def _abort(self) -> None:
        if not self._done:
            self._done = True
            self._front.abort(self.request_id)

    def _put(self, out: RequestOutput) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, out)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            self._front.abort(self.request_id)

    def __del__(self) -> None:
        if not self._done:
            self._front.abort(self.request_id)


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
        self._lock = threading.Lock()
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
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
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._dead = False
            ready = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(ready,), name="baton-engine-loop", daemon=True)
            self._thread.start()
        ready.wait()
        if self._engine is None:
            raise RuntimeError(f"the engine could not be built: {self.last_error}") from self.last_error

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    # ---- requests ----------------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
               sampling_params: SamplingParams | None = None, priority: int = 0) -> RequestStream:
        """Validate and queue a request; returns its output stream. Must be called from a running event loop."""
        if not self.is_healthy():
            raise RuntimeError("the engine loop is not running" + (f": {self.last_error}" if self.last_error else ""))
        req = self.engine.make_request(request_id, prompt, prompt_token_ids, sampling_params, priority)
        stream = RequestStream(self, request_id, asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"duplicate request id {request_id!r}: a request with that id is still running")
            self._streams[request_id] = stream
            self._inbox.append(("add", req))
        self._wake.set()
        return stream

    def abort(self, request_id: str, on_dropped: Callable[[], object] | None = None) -> None:
        """Thread-safe; the request leaves the batch before the next iteration. `on_dropped` is called from the
        loop thread once the engine no longer holds it (the id is then free for a new submission)."""
        with self._lock:
            self._inbox.append(("abort", (request_id, on_dropped)))
        self._wake.set()

    def update_controller(self, **knobs: Any) -> None:
        """Change live knobs (validated now, applied before the next iteration). ValueError on bad ones."""
        self.engine.validate_knobs(knobs)
        with self._lock:
            self._inbox.append(("knobs", knobs))
        self._wake.set()

    def metrics(self) -> dict[str, float]:
        s = self.engine.stats
        cfg = self.engine.config
        return {
            "num_requests_running": float(s.running),
            "num_requests_waiting": float(s.waiting + s.prefilled),
            "num_requests_swapped": float(s.swapped),
            "capacity": float(s.capacity or cfg.max_batch_size),
            "max_batch_size": float(cfg.max_batch_size),
            "preemptions_total": float(s.preemptions),
            "idle_fraction": s.idle_fraction,
            "memory_used_fraction": s.memory_used_fraction,
            "admissions_refused_for_memory": float(s.admissions_refused_for_memory),
            "iterations": float(s.iterations),
            "generated_tokens_total": float(s.generated_tokens),
            "prompt_tokens_total": float(s.prefill_tokens),
        }

    # ---- the loop thread ---------------------------------------------------------------------------------
    def _run(self, ready: threading.Event) -> None:
        if self._engine is None and self._build is not None:
            try:
                self._engine = self._build()
            except BaseException as e:  # noqa: BLE001 - reported by start() in the caller's thread
                self.last_error = e
                self._dead = True
                ready.set()
                return
        ready.set()
        failures = 0
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
                failures = 0
            except Exception as e:  # a bug or a device fault: fail what was in flight, keep serving
                log.exception("engine iteration failed")
                self.last_error = e
                failures += 1
                outs = self.engine.fail_all(f"engine iteration failed: {e}")
                if failures >= MAX_CONSECUTIVE_FAILURES:
                    self._dispatch(outs)
                    self._dead = True
                    self._fail_streams(f"engine loop stopped after repeated failures: {e}")
                    return
            self._dispatch(outs)

    def _drain_inbox(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        for kind, arg in items:
            if kind == "add":
                req: Request = arg
                try:
                    self.engine.enqueue(req)
                except ValueError as e:
                    self._dispatch([RequestOutput(req.request_id, [], "", True, "error", error=str(e))])
            elif kind == "abort":
                request_id, on_dropped = arg
                self.engine.abort_request(request_id)
                self._dispatch(self.engine.outputs.drain())
                if on_dropped is not None:
                    on_dropped()
            elif kind == "knobs":
                self.engine.reconfigure(**arg)

    def _dispatch(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            with self._lock:
                stream = self._streams.pop(out.request_id, None) if out.finished else self._streams.get(
                    out.request_id)
            if stream is not None:
                stream._put(out)

    def _fail_streams(self, message: str) -> None:
        with self._lock:
            streams, self._streams = self._streams, {}
        for rid, stream in streams.items():
            stream._put(RequestOutput(rid, [], "", True, "error", error=message))

"""One request's output stream, as its asyncio consumer sees it, and the registry of open streams a front
keeps for its loop thread.

A stream has two ends. The consumer holds the `RequestStream`; the front's loop thread holds only its
`StreamSink` (in `OpenStreams`), so a consumer that drops its stream lets it be garbage-collected. However a
stream ends early (`aclose()`, cancellation of the task awaiting it, or collection), it ends through one
callable, the front's abort path, exactly once; `on_close` then runs exactly once on every path, the
request's normal end included. No torch here: fronts without a model (test fakes) use the same streams.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Iterable

from configs.errors import FieldError
from engine.request import RequestOutput


class StreamSink:
    """The loop thread's end of a stream: its consumer's event loop and queue (outputs reach it through `_post`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: tuple[int, ...] = (0,)) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.unfinished = set(choices)  # the choices (engine/choices.py) whose final output is still to come


def _put_all(pairs: list[tuple[StreamSink, RequestOutput]]) -> None:
    """On the consumers' event loop: each output onto its stream's queue, in order."""
    for sink, out in pairs:
        sink.queue.put_nowait(out)


def _post(pairs: Iterable[tuple[StreamSink, RequestOutput]]) -> list[str]:
    """Thread-safe: hand each output to its stream, in order, waking each consumer event loop once (one
    `call_soon_threadsafe` with all of its streams' outputs: a step's outputs for a replica's requests share one
    loop). Returns the request ids whose consumer's event loop is closed (nobody can read those streams)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[StreamSink, RequestOutput]]] = {}
    for sink, out in pairs:
        by_loop.setdefault(sink.loop, []).append((sink, out))
    orphans: list[str] = []
    for loop, posted in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, posted)
        except RuntimeError:  # the loop is closed
            orphans.extend(out.request_id for _, out in posted)
    return orphans


# The front's abort path: (request_id, the stream's sink, on_dropped). `on_dropped`, if given, is called
# (from any thread) once the engine no longer holds the request. It must be safe to call from a garbage
# collector's finalizer: it may not take a lock its callers could hold.
AbortFn = Callable[[str, StreamSink | None, Callable[[], object] | None], None]


def _abandon(abort: AbortFn, request_id: str, sink: StreamSink, on_close: Callable[[], None] | None) -> None:
    abort(request_id, sink, None)
    if on_close is not None:
        on_close()


class RequestStream:
    """Async iterator over one request's `RequestOutput`s; the last one has `finished=True`. A request with
    n choices streams each choice's outputs (`RequestOutput.index`), each ending with its own `finished` one;
    the stream ends after the last choice's.

    Leaving early aborts the request: `aclose()`, cancelling the task that awaits the next output, or
    dropping the stream unconsumed (its finalizer).
    """

    def __init__(self, request_id: str, sink: StreamSink, abort: AbortFn,
                 on_close: Callable[[], None] | None = None, choices: tuple[int, ...] = (0,)) -> None:
        self.request_id = request_id
        self._queue = sink.queue
        self._unfinished = set(choices)  # the choices whose final output it has not handed out yet
        self._abort, self._sink, self._on_close = abort, sink, on_close
        # Holds no reference to the stream itself, so it runs when the consumer lets go of the stream.
        self._early_end = weakref.finalize(self, _abandon, abort, request_id, sink, on_close)
        self._early_end.atexit = False

    @property
    def done(self) -> bool:
        """True once the stream has ended (its final output was read, or it was closed or abandoned)."""
        return not self._early_end.alive

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        try:
            out = await self._queue.get()
        except asyncio.CancelledError:
            self._early_end()
            raise
        if out.finished:
            self._unfinished.discard(out.index)
        if not self._unfinished and self._early_end.detach() is not None and self._on_close is not None:
            self._on_close()
        return out

    async def aclose(self) -> None:
        """Abort the request and wait (at most one iteration) until the engine has dropped it, so the
        request id is free for a new submission when this returns."""
        if self._early_end.detach() is None:
            return
        dropped = asyncio.get_running_loop().create_future()
        self._abort(self.request_id, self._sink, _resolver(dropped))
        if self._on_close is not None:
            self._on_close()
        await dropped


def _resolver(future: asyncio.Future[None]) -> Callable[[], None]:
    """A thread-safe callable that resolves `future` on its event loop; never raises into the caller (the
    engine's loop thread), even once that event loop is closed."""
    loop = future.get_loop()

    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    def resolve_threadsafe() -> None:
        try:
            loop.call_soon_threadsafe(resolve)
        except RuntimeError:  # the consumer's event loop is closed: nobody waits any more
            pass

    return resolve_threadsafe


class OpenStreams:
    """The streams of the requests a front holds, by request id. Thread-safe.

    Once `close()` has run, no stream opens any more and every stream that was open has been failed, so
    no consumer waits for an output that will never come.
    """

    def __init__(self) -> None:
        # Reentrant: a dropped stream's finalizer may run on a thread that holds it (on any allocation).
        self._lock = threading.RLock()
        self._sinks: dict[str, StreamSink] = {}
        self._closed = False

    def open(self, request_id: str, abort: AbortFn, on_close: Callable[[], None] | None = None,
             then: Callable[[], None] = lambda: None, choices: tuple[int, ...] = (0,)) -> RequestStream:
        """Register a stream for `request_id` on the running event loop and call `then()` (e.g. queue the
        request) under the same lock, so `close()` sees either both or neither. `choices`: the indices of
        the choices whose outputs it carries; it closes after each has had its final output.

        Raises FieldError for an id that is still open, RuntimeError once the front is closed."""
        sink = StreamSink(asyncio.get_running_loop(), choices)
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine loop is not running")
            if request_id in self._sinks:
                raise FieldError("request_id",
                                 f"duplicate request id {request_id!r}: a request with that id is still running")
            self._sinks[request_id] = sink
            then()
        return RequestStream(request_id, sink, abort, on_close, choices)

    def reopen(self) -> None:
        """Accept streams again (the front's loop restarted)."""
        with self._lock:
            self._closed = False

    def holds(self, request_id: str, sink: StreamSink) -> bool:
        """Whether `sink` is still the open stream of `request_id` (not finished, not replaced by a new
        request that reuses the id)."""
        with self._lock:
            return self._sinks.get(request_id) is sink

    def deliver(self, outs: Iterable[RequestOutput]) -> list[str]:
        """Hand outputs to their streams (a finished one closes its stream), in order, each consumer event loop
        woken once per call (`_post`: one wake-up per step, not one per request). Returns the ids whose consumer's
        event loop is gone, for the caller to abort."""
        pairs = []
        with self._lock:
            for out in outs:
                sink = self._sinks.get(out.request_id)
                if sink is None:
                    continue
                if out.finished:
                    sink.unfinished.discard(out.index)
                    if not sink.unfinished:
                        del self._sinks[out.request_id]
                pairs.append((sink, out))
        return _post(pairs)

    def close(self, message: str) -> None:
        """Refuse new streams and fail every open one with an `error` output carrying `message`."""
        with self._lock:
            self._closed = True
            sinks, self._sinks = self._sinks, {}
        _post((sink, RequestOutput(request_id, [], "", True, "error", error=message, index=index))
              for request_id, sink in sinks.items() for index in sorted(sink.unfinished))

    @property
    def closed(self) -> bool:
        return self._closed

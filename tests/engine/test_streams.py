"""engine/streams.py: how the engine's loop thread hands a step's outputs to the consumers' event loops."""

from __future__ import annotations

import asyncio
import threading

from engine.request import RequestOutput
from engine.streams import OpenStreams, RequestStream


def _no_abort(*_: object) -> None:
    raise AssertionError("nothing is aborted here")


def test_a_steps_outputs_wake_each_event_loop_once_and_keep_their_order() -> None:
    """Outputs for several streams of one event loop, handed over from another thread (the loop thread) in one
    `deliver`: one wake-up of that loop (one `call_soon_threadsafe`), and each stream reads its own outputs in order,
    ending at its final one."""

    async def run() -> tuple[int, list[list[int]], list[str]]:
        loop = asyncio.get_running_loop()
        streams = OpenStreams()
        a = streams.open("a", _no_abort)
        b = streams.open("b", _no_abort)
        wakes = []
        real = loop.call_soon_threadsafe

        def counted(*args):  # type: ignore[no-untyped-def]
            wakes.append(args)
            return real(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        orphans: list[str] = []
        outs = [RequestOutput("a", [1], "x"), RequestOutput("b", [7], "y"), RequestOutput("a", [2], "z"),
                RequestOutput("b", [8], "w", True, "length"), RequestOutput("a", [3], "v", True, "stop"),
                RequestOutput("gone", [9], "u")]  # a stream nobody holds any more: dropped
        thread = threading.Thread(target=lambda: orphans.extend(streams.deliver(outs)))
        thread.start()
        thread.join()
        got = [await _tokens(s) for s in (a, b)]
        return len(wakes), got, orphans

    wakes, got, orphans = asyncio.run(run())
    assert wakes == 1
    assert got == [[1, 2, 3], [7, 8]]
    assert orphans == []


def test_outputs_for_a_closed_event_loop_come_back_as_orphans() -> None:
    """A stream whose consumer's event loop has closed cannot be read: `deliver` returns its id for the caller to
    abort, and the other loop's stream still gets its output."""
    streams = OpenStreams()
    dead = asyncio.new_event_loop()
    dead.run_until_complete(_open(streams, "lost"))
    dead.close()

    async def run() -> tuple[list[str], list[int]]:
        alive = streams.open("kept", _no_abort)
        orphans = streams.deliver([RequestOutput("lost", [1], "a"), RequestOutput("kept", [2], "b", True, "length")])
        return orphans, await _tokens(alive)

    orphans, kept = asyncio.run(run())
    assert orphans == ["lost"]
    assert kept == [2]


async def _open(streams: OpenStreams, request_id: str) -> None:
    streams._kept = streams.open(request_id, lambda *_: None)  # type: ignore[attr-defined]  # held past the loop


async def _tokens(stream: RequestStream) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]

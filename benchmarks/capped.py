"""Running a benchmark's client requests concurrently under a time cap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine, Iterable
from typing import Any


async def run_capped(coros: Iterable[Coroutine[Any, Any, None]], cap_s: float, t0: float) -> float:
    """Run `coros` as tasks for at most `cap_s` seconds, then cancel and await whatever is left (so nothing
    outlives the run). Returns the wall time from `t0` until the last task ended or the cap passed."""
    tasks = [asyncio.create_task(c) for c in coros]
    _, pending = await asyncio.wait(tasks, timeout=cap_s)
    wall = time.perf_counter() - t0
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return wall

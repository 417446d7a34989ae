"""The memory-probe interface and the one rule every device probe uses to read 'used' honestly."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class MemoryReading:
    """One reading of device memory, in bytes. `engine_bytes` is what the engine itself accounts for."""

    used_bytes: int  # everything in use on the device (all tenants), as the probe sees it
    total_bytes: int  # the budget the controller must stay under
    engine_bytes: int  # the engine's own accounting: cache + pool + weights it was told about
    source: str  # probe name, for metrics and logs


class ProbeUnavailable(RuntimeError):
    """This probe cannot run here (no NVML, no CUDA, no limit to measure against). `auto` tries the next."""


class MemoryProbe(Protocol):
    """Reads device memory once per engine iteration. Must be cheap: it runs before every decode step."""

    @property
    def name(self) -> str:
        """Probe name, reported as `MemoryReading.source`."""
        ...

    @property
    def sees_whole_cache(self) -> bool:
        """True when the reading counts the engine's whole preallocated cache buffer (a real device or
        process reading), False when it counts only `engine_bytes` (the simulated probe). The engine takes
        the buffer's unused headroom out of a reading that sees it (see `engine/scheduler.py`)."""
        ...

    def read(self, engine_bytes: int, iteration: int) -> MemoryReading:
        """One reading. `engine_bytes` is what the engine accounts it holds on the device (weights, cache,
        prefilled pool); `iteration` is the engine iteration (only the simulated probe uses it)."""
        ...


def effective_used(device_used: int, allocator_slack: int) -> int:
    """Device bytes in use, not counting what this process's caching allocator holds but has free.

    NVML and `cudaMemGetInfo` count everything PyTorch's caching allocator has reserved; the part of that
    reservation not backing a live tensor (`memory_reserved - memory_allocated`) is reusable by the engine,
    so it is free for our purposes. The controller then takes `max(this, engine_bytes)`, so the reading is
    never below what the engine knows it holds.
    """
    return max(0, device_used - max(0, allocator_slack))


def cap_total(device_total: int, budget_bytes: int | None) -> int:
    """The budget the controller must stay under: the device total, capped by a configured budget."""
    return device_total if budget_bytes is None else min(device_total, budget_bytes)


def torch_allocator_slack() -> int:
    """Bytes PyTorch's CUDA caching allocator has reserved but not allocated on the current device.

    Zero when torch was never imported or CUDA never initialised in this process: then there is no caching
    allocator holding anything, and we must not import torch (or create a CUDA context) just to ask.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.memory_reserved()) - int(torch.cuda.memory_allocated())

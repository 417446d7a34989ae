"""torch.cuda probe: device-wide free/total from `mem_get_info`, corrected by the caching allocator's slack."""

from __future__ import annotations

from typing import Any

from autoscaler.probes.base import MemoryReading, ProbeUnavailable, cap_total, effective_used


class TorchCudaProbe:
    """Reads `torch.cuda.mem_get_info`, `memory_reserved` and `memory_allocated` of one CUDA device.

    torch is imported here, when the probe is built, never at module import.
    """

    name = "torch"

    sees_whole_cache = True  # reads the device (or process), so it sees the preallocated cache buffer

    def __init__(self, budget_bytes: int | None = None, device: int = 0) -> None:
        """`device`: CUDA index as this process sees it (0 = the first visible device)."""
        try:
            import torch
        except ImportError as e:
            raise ProbeUnavailable("torch is not installed") from e
        if not torch.cuda.is_available():
            raise ProbeUnavailable("torch.cuda is not available (no GPU, or a CPU build of torch)")
        self._cuda: Any = torch.cuda
        self.budget_bytes = budget_bytes
        self.device = device

    def read(self, engine_bytes: int, iteration: int) -> MemoryReading:
        free, total = self._cuda.mem_get_info(self.device)
        slack = int(self._cuda.memory_reserved(self.device)) - int(self._cuda.memory_allocated(self.device))
        return MemoryReading(
            used_bytes=effective_used(int(total) - int(free), slack),
            total_bytes=cap_total(int(total), self.budget_bytes),
            engine_bytes=engine_bytes,
            source=self.name,
        )

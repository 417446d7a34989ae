"""Memory probes: one small interface, one implementation per source. Built by name in autoscaler.registry."""

from autoscaler.probes.base import (
    MemoryProbe,
    ProbeUnavailable,
    cap_total,
    effective_used,
    torch_allocator_slack,
)
from autoscaler.probes.host import HostProbe
from autoscaler.probes.nvml import NvmlProbe
from autoscaler.probes.simulated import SimulatedProbe
from autoscaler.probes.torch_cuda import TorchCudaProbe

__all__ = [
    "HostProbe",
    "MemoryProbe",
    "NvmlProbe",
    "ProbeUnavailable",
    "SimulatedProbe",
    "TorchCudaProbe",
    "cap_total",
    "effective_used",
    "torch_allocator_slack",
]

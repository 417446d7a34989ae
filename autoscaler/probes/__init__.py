"""Memory probes: one small interface, one implementation per source, built by name (registry.py)."""

from autoscaler.probes.base import (
    MemoryProbe,
    MemoryReading,
    ProbeUnavailable,
    cap_total,
    effective_used,
    torch_allocator_slack,
)
from autoscaler.probes.host import HostProbe
from autoscaler.probes.nvml import NvmlProbe
from autoscaler.probes.registry import NO_PROBE, PROBES, build_probe
from autoscaler.probes.simulated import SimulatedProbe
from autoscaler.probes.torch_cuda import TorchCudaProbe

__all__ = [
    "NO_PROBE",
    "PROBES",
    "MemoryReading",
    "build_probe",
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

"""Memory probes, the per-iteration capacity controller, and the Ray Serve replica autoscaling policy.

Nothing here imports torch or Ray at module import time (the Serve policy module may import Ray).
"""

from autoscaler.capacity import (
    CapacityController,
    CapacityDecision,
    CapacitySnapshot,
    FixedCapacityController,
    MemoryReading,
    Preemption,
    QueuedInfo,
    RowInfo,
)
from autoscaler.memory_controller import MemoryController, decide_capacity, predicted_peak_bytes
from autoscaler.probes import (
    HostProbe,
    MemoryProbe,
    NvmlProbe,
    ProbeUnavailable,
    SimulatedProbe,
    TorchCudaProbe,
)
from autoscaler.registry import PROBES, build_controller, build_probe

__all__ = [
    "PROBES",
    "CapacityController",
    "CapacityDecision",
    "CapacitySnapshot",
    "FixedCapacityController",
    "HostProbe",
    "MemoryController",
    "MemoryProbe",
    "MemoryReading",
    "NvmlProbe",
    "Preemption",
    "ProbeUnavailable",
    "QueuedInfo",
    "RowInfo",
    "SimulatedProbe",
    "TorchCudaProbe",
    "build_controller",
    "build_probe",
    "decide_capacity",
    "predicted_peak_bytes",
]

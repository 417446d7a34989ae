"""What scales replicas and reads memory: the memory probes and the Ray Serve replica autoscaling policy.

The per-iteration capacity controller lives beside the scheduler it serves (engine/capacity.py,
engine/memory_controller.py). Nothing here imports torch or Ray at module import time (the Serve policy
module may import Ray).
"""

from autoscaler.probes import (
    PROBES,
    HostProbe,
    MemoryProbe,
    MemoryReading,
    NvmlProbe,
    ProbeUnavailable,
    SimulatedProbe,
    TorchCudaProbe,
    build_probe,
)

__all__ = [
    "PROBES",
    "HostProbe",
    "MemoryProbe",
    "MemoryReading",
    "NvmlProbe",
    "ProbeUnavailable",
    "SimulatedProbe",
    "TorchCudaProbe",
    "build_probe",
]

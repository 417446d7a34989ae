"""Probes by name: the one place `ControllerConfig.probe` is turned into a probe."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

from autoscaler.probes.base import MemoryProbe, ProbeUnavailable
from autoscaler.probes.host import HostProbe
from autoscaler.probes.nvml import NvmlProbe
from autoscaler.probes.simulated import SimulatedProbe
from autoscaler.probes.torch_cuda import TorchCudaProbe
from configs.controller import ControllerConfig

ProbeFactory = Callable[[ControllerConfig], MemoryProbe]

NO_PROBE = "fixed"  # the fixed-capacity controller reads no memory
AUTO_ORDER = ("nvml", "torch", "host")  # what `auto` tries, best first


def _simulated(config: ControllerConfig) -> MemoryProbe:
    if config.memory_budget_bytes is None:  # the config validator already insists; this keeps mypy honest
        raise ValueError("probe='simulated' needs memory_budget_bytes")
    return SimulatedProbe(config.memory_budget_bytes, config.pressure_trace)


def _auto(config: ControllerConfig) -> MemoryProbe:
    reasons = []
    for name in AUTO_ORDER:
        try:
            return PROBES[name](config)
        except ProbeUnavailable as e:
            reasons.append(f"{name}: {e}")
    raise ProbeUnavailable("no memory probe works here (" + "; ".join(reasons) + ")")


PROBES: Mapping[str, ProbeFactory] = {
    "nvml": lambda c: NvmlProbe(
        c.memory_budget_bytes, visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES")
    ),
    "torch": lambda c: TorchCudaProbe(c.memory_budget_bytes),
    "host": lambda c: HostProbe(c.memory_budget_bytes),
    "simulated": _simulated,
    "auto": _auto,
}


def build_probe(config: ControllerConfig) -> MemoryProbe | None:
    """The probe `config.probe` names; None for "fixed". Raises ProbeUnavailable if it cannot run here."""
    if config.probe == NO_PROBE:
        return None
    return PROBES[config.probe](config)


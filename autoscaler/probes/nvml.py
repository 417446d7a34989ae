"""NVML probe: the replica's GPU as the driver sees it (all processes), via `pynvml` (nvidia-ml-py)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from autoscaler.probes.base import (
    MemoryReading,
    ProbeUnavailable,
    cap_total,
    effective_used,
    torch_allocator_slack,
)


class NvmlProbe:
    """Used/total of the first GPU in `CUDA_VISIBLE_DEVICES` (an index or a GPU-/MIG- UUID, or a UUID prefix).

    NVML is initialised once, here; each `read` is one `nvmlDeviceGetMemoryInfo` call. NVML indices follow
    PCI bus order: set `CUDA_DEVICE_ORDER=PCI_BUS_ID` (Ray does) so CUDA's index means the same device.
    """

    name = "nvml"

    sees_whole_cache = True  # reads the device (or process), so it sees the preallocated cache buffer

    def __init__(
        self,
        budget_bytes: int | None = None,
        visible_devices: str | None = None,
        allocator_slack: Callable[[], int] = torch_allocator_slack,
    ) -> None:
        """`visible_devices`: the value of CUDA_VISIBLE_DEVICES (None = unset: device 0).
        `allocator_slack`: reserved-but-free bytes of this process's caching allocator (see effective_used)."""
        self.budget_bytes = budget_bytes
        self._allocator_slack = allocator_slack
        self._nvml = _load_pynvml()
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as e:
            raise ProbeUnavailable(f"NVML could not initialise (no NVIDIA driver or GPU?): {e}") from e
        self._handle = _device_handle(self._nvml, visible_devices)

    def read(self, engine_bytes: int, iteration: int) -> MemoryReading:
        try:
            info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
        except self._nvml.NVMLError as e:
            raise RuntimeError(f"NVML memory read failed: {e}") from e
        return MemoryReading(
            used_bytes=effective_used(int(info.used), self._allocator_slack()),
            total_bytes=cap_total(int(info.total), self.budget_bytes),
            engine_bytes=engine_bytes,
            source=self.name,
        )

    def close(self) -> None:
        """Release this probe's NVML reference (NVML counts init/shutdown pairs)."""
        self._nvml.nvmlShutdown()


def _load_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as e:
        raise ProbeUnavailable("NVML is not available: install nvidia-ml-py (module 'pynvml')") from e


def _device_handle(nvml: Any, visible_devices: str | None) -> Any:
    """NVML handle of the first device CUDA would expose as cuda:0."""
    first = "0" if visible_devices is None else visible_devices.split(",")[0].strip()
    if not first:
        raise ProbeUnavailable(f"CUDA_VISIBLE_DEVICES={visible_devices!r} makes no GPU visible")
    try:
        if first.lstrip("-").isdigit():
            index = int(first)
            if index < 0:  # CUDA stops at the first invalid entry: nothing visible
                raise ProbeUnavailable(f"CUDA_VISIBLE_DEVICES={visible_devices!r} makes no GPU visible")
            return nvml.nvmlDeviceGetHandleByIndex(index)
        if first.startswith(("GPU-", "MIG-")):
            return _handle_by_uuid(nvml, first)
    except nvml.NVMLError as e:
        raise ProbeUnavailable(
            f"NVML has no device {first!r} (CUDA_VISIBLE_DEVICES={visible_devices!r}): {e}"
        ) from e
    raise ValueError(
        f"CUDA_VISIBLE_DEVICES={visible_devices!r}: first entry {first!r} is neither an index nor a GPU-/MIG- UUID"
    )


def _handle_by_uuid(nvml: Any, uuid: str) -> Any:
    """A full UUID resolves directly; CUDA also accepts a unique prefix, which we match by enumeration."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid)
    except nvml.NVMLError:
        matches = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            device_uuid = nvml.nvmlDeviceGetUUID(handle)
            if isinstance(device_uuid, bytes):
                device_uuid = device_uuid.decode()
            if device_uuid.startswith(uuid):
                matches.append(handle)
        if len(matches) != 1:
            raise
        return matches[0]

"""Memory probes against fakes: a fake `pynvml`, a fake `torch`, fake /proc and cgroup files."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, get_args

import pytest

from autoscaler.probes import (
    HostProbe,
    NvmlProbe,
    ProbeUnavailable,
    SimulatedProbe,
    TorchCudaProbe,
    effective_used,
    torch_allocator_slack,
)
from autoscaler.probes.host import default_cgroup_limit_paths, read_limit
from autoscaler.probes.registry import NO_PROBE, PROBES, build_probe
from configs.controller import ControllerConfig, PressureEvent, ProbeName
from engine.capacity import FixedCapacityController
from engine.memory_controller import MemoryController, build_controller

GIB = 1 << 30

# ---- simulated ---------------------------------------------------------------------------------------


def test_simulated_probe_follows_the_trace() -> None:
    trace = (PressureEvent(iteration=10, fraction=0.5), PressureEvent(iteration=5, fraction=0.25))  # unsorted
    probe = SimulatedProbe(1000, trace)
    assert [probe.external_bytes(i) for i in (0, 4, 5, 9, 10, 99)] == [0, 0, 250, 250, 500, 500]
    reading = probe.read(engine_bytes=100, iteration=7)
    assert (reading.used_bytes, reading.total_bytes, reading.engine_bytes, reading.source) == (
        350,
        1000,
        100,
        "simulated",
    )
    assert probe.read(100, 7) == reading  # deterministic
    with pytest.raises(ValueError, match="budget_bytes"):
        SimulatedProbe(0)


# ---- NVML ------------------------------------------------------------------------------------------


class FakeNvml(types.ModuleType):
    """Just enough of pynvml: devices by index and UUID, memory info, init/shutdown counters."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[tuple[str, int, int]], init_fails: bool = False) -> None:
        super().__init__("pynvml")
        self.devices = devices  # (uuid, used, total) by NVML index
        self.init_fails = init_fails
        self.inits = 0
        self.reads = 0

    def nvmlInit(self) -> None:
        if self.init_fails:
            raise self.NVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.inits -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if not 0 <= index < len(self.devices):
            raise self.NVMLError("Invalid Argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for index, (device_uuid, _, _) in enumerate(self.devices):
            if device_uuid == uuid:
                return index
        raise self.NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.devices[handle][0].encode()  # older pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        self.reads += 1
        _, used, total = self.devices[handle]
        return types.SimpleNamespace(used=used, total=total, free=total - used)


DEVICES = [
    ("GPU-aaaa1111-0000", 1 * GIB, 80 * GIB),
    ("GPU-bbbb2222-0000", 2 * GIB, 80 * GIB),
    ("GPU-cccc3333-0000", 3 * GIB, 40 * GIB),
]


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    fake = FakeNvml(DEVICES)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def no_slack() -> int:
    return 0


@pytest.mark.parametrize(
    ("visible", "used_gib"),
    [
        (None, 1),  # unset: device 0
        ("2", 3),
        (" 1 , 0", 2),  # first entry, spaces tolerated
        ("GPU-cccc3333-0000,0", 3),  # full UUID
        ("GPU-bbbb", 2),  # unique UUID prefix, as CUDA accepts
    ],
)
def test_nvml_reads_the_first_visible_device(nvml: FakeNvml, visible: str | None, used_gib: int) -> None:
    probe = NvmlProbe(visible_devices=visible, allocator_slack=no_slack)
    assert probe.read(engine_bytes=7, iteration=0).used_bytes == used_gib * GIB


@pytest.mark.parametrize("visible", ["", "-1", "7", "GPU-ffff", "GPU-"])
def test_nvml_no_visible_device(nvml: FakeNvml, visible: str) -> None:
    with pytest.raises(ProbeUnavailable, match="CUDA_VISIBLE_DEVICES"):
        NvmlProbe(visible_devices=visible)


def test_nvml_rejects_a_malformed_device(nvml: FakeNvml) -> None:
    with pytest.raises(ValueError, match="'gpu0'"):
        NvmlProbe(visible_devices="gpu0")


def test_nvml_inits_once_and_reads_cheaply(nvml: FakeNvml) -> None:
    probe = NvmlProbe(budget_bytes=10 * GIB, allocator_slack=lambda: GIB // 2)
    readings = [probe.read(engine_bytes=0, iteration=i) for i in range(5)]
    assert nvml.inits == 1 and nvml.reads == 5
    # total capped by the budget; the caching allocator's free half GiB does not count as used
    assert readings[0].total_bytes == 10 * GIB and readings[0].used_bytes == GIB // 2
    assert readings[0].source == "nvml"
    probe.close()
    assert nvml.inits == 0


def test_nvml_read_failure_is_a_clear_error(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = NvmlProbe(allocator_slack=no_slack)

    def lost(handle: int) -> Any:
        raise nvml.NVMLError("GPU is lost")

    monkeypatch.setattr(nvml, "nvmlDeviceGetMemoryInfo", lost)
    with pytest.raises(RuntimeError, match="NVML memory read failed: GPU is lost"):
        probe.read(0, 0)


def test_nvml_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(ProbeUnavailable, match="nvidia-ml-py"):
        NvmlProbe()


def test_nvml_without_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(DEVICES, init_fails=True))
    with pytest.raises(ProbeUnavailable, match="Driver Not Loaded"):
        NvmlProbe()


def test_registry_passes_cuda_visible_devices(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    probe = build_probe(ControllerConfig(probe="nvml"))
    assert probe is not None and probe.read(0, 0).used_bytes == 2 * GIB


# ---- torch.cuda and the allocator rule -------------------------------------------------------------


def fake_torch(available: bool = True, initialized: bool = True) -> types.ModuleType:
    """A `torch` with a `cuda` namespace: 80 GiB device, 30 GiB used device-wide, 12 reserved, 8 allocated."""
    cuda = types.SimpleNamespace(
        is_available=lambda: available,
        is_initialized=lambda: initialized,
        mem_get_info=lambda device=None: (50 * GIB, 80 * GIB),
        memory_reserved=lambda device=None: 12 * GIB,
        memory_allocated=lambda device=None: 8 * GIB,
    )
    module = types.ModuleType("torch")
    module.cuda = cuda  # type: ignore[attr-defined]
    return module


def test_effective_used_discounts_allocator_slack() -> None:
    assert effective_used(30 * GIB, 4 * GIB) == 26 * GIB
    assert effective_used(GIB, 4 * GIB) == 0
    assert effective_used(GIB, -5) == GIB


def test_torch_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    reading = TorchCudaProbe(budget_bytes=60 * GIB).read(engine_bytes=5, iteration=0)
    # 30 GiB used device-wide, minus the 4 GiB the caching allocator holds free
    assert (reading.used_bytes, reading.total_bytes, reading.source) == (26 * GIB, 60 * GIB, "torch")


def test_torch_probe_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", fake_torch(available=False))
    with pytest.raises(ProbeUnavailable, match="torch.cuda is not available"):
        TorchCudaProbe()


def test_allocator_slack_never_imports_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert torch_allocator_slack() == 0
    assert "torch" not in sys.modules
    monkeypatch.setitem(sys.modules, "torch", fake_torch(initialized=False))
    assert torch_allocator_slack() == 0
    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    assert torch_allocator_slack() == 4 * GIB


# ---- host ------------------------------------------------------------------------------------------


@pytest.fixture
def statm(tmp_path: Path) -> Path:
    path = tmp_path / "statm"
    path.write_text("5000 1000 300 10 0 900 0\n")  # resident: 1000 pages
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_host_probe_reads_rss_against_the_cgroup_limit(tmp_path: Path, statm: Path) -> None:
    limits = [
        write(tmp_path, "v2/memory.max", "max\n"),  # unlimited: ignored
        write(tmp_path, "v1/memory.limit_in_bytes", "9223372036854771712\n"),  # v1 unlimited: ignored
        write(tmp_path, "own/memory.max", f"{4 * GIB}\n"),
        tmp_path / "absent",
    ]
    probe = HostProbe(statm_path=statm, cgroup_limit_paths=limits)
    reading = probe.read(engine_bytes=3, iteration=0)
    page = probe.resident_bytes() // 1000
    assert reading.used_bytes == 1000 * page and page > 0
    assert (reading.total_bytes, reading.engine_bytes, reading.source) == (4 * GIB, 3, "host")
    # a configured budget below the cgroup limit wins; above it, the cgroup (where the OOM killer is) wins
    assert HostProbe(GIB, statm_path=statm, cgroup_limit_paths=limits).total_bytes == GIB
    assert HostProbe(8 * GIB, statm_path=statm, cgroup_limit_paths=limits).total_bytes == 4 * GIB


def test_host_probe_falls_back_to_budget_then_memtotal(tmp_path: Path, statm: Path) -> None:
    none = [write(tmp_path, "memory.max", "max")]
    assert HostProbe(GIB, statm_path=statm, cgroup_limit_paths=none).total_bytes == GIB
    meminfo = write(tmp_path, "meminfo", "MemTotal:       24684092 kB\nMemFree: 1 kB\n")
    probe = HostProbe(statm_path=statm, cgroup_limit_paths=none, meminfo_path=meminfo)
    assert probe.total_bytes == 24684092 * 1024
    with pytest.raises(ProbeUnavailable, match="no cgroup memory limit"):
        HostProbe(statm_path=statm, cgroup_limit_paths=none, meminfo_path=tmp_path / "absent")


def test_host_probe_without_statm_or_psutil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)
    with pytest.raises(ProbeUnavailable, match="psutil"):
        HostProbe(GIB, statm_path=tmp_path / "absent", cgroup_limit_paths=[])


@pytest.mark.parametrize(
    ("text", "limit"), [("1073741824\n", GIB), ("max\n", None), ("0", None), ("garbage", None), ("", None)]
)
def test_read_limit(tmp_path: Path, text: str, limit: int | None) -> None:
    assert read_limit(write(tmp_path, "limit", text)) == limit


def test_default_cgroup_paths_follow_the_process_cgroup(tmp_path: Path) -> None:
    proc = write(tmp_path, "cgroup", "4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/user.slice/app\n")
    root = tmp_path / "fs"
    assert default_cgroup_limit_paths(proc, root) == [
        root / "memory/process_api/abc/memory.limit_in_bytes",
        root / "user.slice/app/memory.max",
        root / "memory.max",
        root / "memory/memory.limit_in_bytes",
    ]


def test_host_probe_on_this_machine() -> None:
    reading = HostProbe().read(0, 0)
    assert 0 < reading.used_bytes < reading.total_bytes


# ---- registry ----------------------------------------------------------------------------------------


def test_registry_covers_every_probe_name() -> None:
    assert set(PROBES) | {NO_PROBE} == set(get_args(ProbeName))


def test_fixed_builds_no_probe_and_the_fixed_controller() -> None:
    config = ControllerConfig()
    assert build_probe(config) is None
    assert isinstance(build_controller(config), FixedCapacityController)


def test_memory_probes_build_the_memory_controller() -> None:
    config = ControllerConfig(probe="simulated", memory_budget_bytes=GIB)
    assert isinstance(build_probe(config), SimulatedProbe)
    controller = build_controller(config)
    assert isinstance(controller, MemoryController) and controller.config is config


def test_auto_prefers_nvml_then_torch_then_host(monkeypatch: pytest.MonkeyPatch, nvml: FakeNvml) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = ControllerConfig(probe="auto")
    assert isinstance(build_probe(config), NvmlProbe)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "torch", fake_torch())
    assert isinstance(build_probe(config), TorchCudaProbe)
    monkeypatch.setitem(sys.modules, "torch", fake_torch(available=False))
    assert isinstance(build_probe(config), HostProbe)

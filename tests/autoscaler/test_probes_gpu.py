"""Probes on a real NVIDIA GPU. Skipped cleanly where there is none."""

from __future__ import annotations

import os

import pytest

from autoscaler.probes import NvmlProbe, ProbeUnavailable, TorchCudaProbe

pytestmark = pytest.mark.gpu

MIB = 1 << 20


@pytest.fixture
def nvml_probe() -> NvmlProbe:
    try:
        return NvmlProbe(visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    except ProbeUnavailable as e:
        pytest.skip(f"no GPU via NVML: {e}")


def test_nvml_reads_the_device(nvml_probe: NvmlProbe) -> None:
    reading = nvml_probe.read(engine_bytes=0, iteration=0)
    assert 0 < reading.used_bytes < reading.total_bytes
    nvml_probe.close()


def test_torch_and_nvml_agree_and_ignore_allocator_slack(nvml_probe: NvmlProbe) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    probe = TorchCudaProbe()
    before = probe.read(0, 0).used_bytes
    block = torch.empty(512 * MIB, dtype=torch.uint8, device="cuda")
    held = probe.read(0, 0).used_bytes
    assert held - before >= 500 * MIB
    # NVML sees the same device; both discount the caching allocator's free blocks the same way.
    assert abs(nvml_probe.read(0, 0).used_bytes - held) < 64 * MIB
    del block  # the allocator keeps the block reserved: NVML still counts it, the probes do not
    assert torch.cuda.memory_reserved() - torch.cuda.memory_allocated() >= 500 * MIB
    assert probe.read(0, 0).used_bytes - before < 64 * MIB
    nvml_probe.close()

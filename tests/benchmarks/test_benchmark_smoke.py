"""The comparison harness end to end on a tiny random Llama: every system runs and every output is written."""

from __future__ import annotations

import json

from benchmarks.compare import main
from benchmarks.systems import SYSTEMS
from benchmarks.workloads import WORKLOADS


def test_compare_smoke_writes_every_system_and_plot(tmp_path):
    assert main(["--smoke", "--out", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "compare.json").read_text())
    assert set(report["workloads"]) == set(WORKLOADS)
    for name, workload in report["workloads"].items():
        assert set(workload["systems"]) == set(SYSTEMS), name
        for system, r in workload["systems"].items():
            assert r["tokens_per_s"] > 0, (name, system)
            assert r["exact_lengths"], (name, system)  # everyone generated exactly each request's length
            assert r["useful_tokens"] == workload["summary"]["output_tokens"]["total"], (name, system)
            assert 0.0 <= r["idle_fraction"] < 1.0 and 0.0 <= r["outside_forward_fraction"] < 1.0
            assert r["peak_memory_mib"] > 0
    poisson = report["workloads"]["poisson"]["systems"]
    assert all(r["latency"]["ttft_s"]["p99"] is not None for r in poisson.values())
    # Engine policies report their per-iteration timeline; the re-batching policies never compute idle slots.
    anyscale = report["workloads"]["anyscale"]["systems"]
    assert anyscale["baton-pd"]["timeline"] and anyscale["baton-pd"]["idle_fraction"] == 0.0
    assert {t["target"] for t in report["targets"]} and (tmp_path / "compare.md").read_text().startswith("# ")
    for plot in ("throughput", "occupancy", "memory"):
        png = tmp_path / f"compare.{plot}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot

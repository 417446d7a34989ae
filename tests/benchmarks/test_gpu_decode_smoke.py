"""The GPU decode benchmark runs its code path on CPU in smoke mode, and skips cleanly without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_decode


def test_gpu_decode_smoke_on_cpu(tmp_path: Path) -> None:
    assert gpu_decode.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_decode.json").read_text())
    sweep = report["shapes"]["toy"]["decode"]
    assert [r["rows"] for r in sweep] == [1, 4] and all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in sweep)
    anyscale = report["shapes"]["toy"]["anyscale"]
    assert anyscale["baton-pd"]["idle_fraction"] == 0.0 and anyscale["static"]["useful_tokens_per_s"] > 0
    assert (tmp_path / "gpu_decode.png").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_decode_without_gpu_exits_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_decode.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "gpu_decode.json").exists()

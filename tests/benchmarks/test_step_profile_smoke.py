"""The decode-step profile's smoke mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_step_profile_smoke_measures_both_kernels(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_profile", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "step_profile.json").read_text())
    assert [r["rows"] for r in result["step_times"]] == [1, 4]
    for r in result["step_times"]:
        assert r["step_ms_narrow"] > 0 and r["step_ms_linear"] > 0
        assert r["speedup"] == r["step_ms_linear"] / r["step_ms_narrow"]
    assert set(result["breakdown_ms"]) == {"linear", "narrow"}
    for kinds in result["breakdown_ms"].values():
        assert set(kinds) == {"layer linears", "LM head", "attention", "other"} and sum(kinds.values()) > 0
    table = (tmp_path / "step_profile.md").read_text()
    assert "| 4 |" in table and "LM head" in table and "narrow linear" in table

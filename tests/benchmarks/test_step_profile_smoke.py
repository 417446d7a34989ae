"""The decode-step profile's smoke mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_step_profile_smoke_measures_every_kernel(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step_profile", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "step_profile.json").read_text())
    assert [r["rows"] for r in result["step_times"]] == [1, 4]
    kernels = result["kernels"]
    assert kernels[:2] == ["linear", "transposed"] and set(kernels) <= {"linear", "transposed", "compiled", "captured"}
    assert ("compiled" in kernels) == (result["compiled_unavailable"] is None)
    assert ("captured" in kernels) == ("compiled" in kernels and result["captured_unavailable"] is None)
    for r in result["step_times"]:
        assert all(r[f"step_ms_{k}"] > 0 for k in kernels)
        for k in kernels[1:]:
            assert r[f"speedup_{k}"] == r["step_ms_linear"] / r[f"step_ms_{k}"]
    assert set(result["breakdown_ms"]) == set(kernels)
    for kinds in result["breakdown_ms"].values():
        assert set(kinds) == {"layer linears", "LM head", "attention", "other"} and sum(kinds.values()) > 0
    table = (tmp_path / "step_profile.md").read_text()
    assert "| 4 |" in table and "LM head" in table and "step ms, transposed" in table

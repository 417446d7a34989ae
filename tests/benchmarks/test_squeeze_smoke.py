"""The memory-squeeze benchmark's smoke mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_squeeze_smoke_completes_under_budget(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.squeeze", "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "squeeze.json").read_text())
    fixed, controlled = result["fixed_under_budget"], result["controlled"]
    assert fixed["max_ratio"] > 1.0  # the uncontrolled engine overflows the budget...
    assert controlled["iterations_over_budget"] == 0  # ...the controlled one never does
    assert controlled["completed"] == result["unconstrained"]["completed"]
    assert controlled["mismatched_requests"] == []
    assert (tmp_path / "squeeze.png").stat().st_size > 0

"""The batch-invariance diagnostic's smoke mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_batch_invariance_smoke_reports_every_check(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.batch_invariance", "--smoke", "--unaligned",
                           "--cost", "1", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "batch_invariance.json").read_text())
    aligned, unaligned = result["runs"]
    assert (aligned["layout"], unaligned["layout"]) == ("aligned", "unaligned")
    # The fix holds on the tiny model too; without it the layer check sees attention differ.
    assert aligned["engine"]["identical"] == aligned["engine"]["requests"] == 6
    assert aligned["layers"]["bit_identical"] == aligned["layers"]["cases"] > 0
    assert unaligned["layers"]["bit_identical"] < unaligned["layers"]["cases"]
    assert all("self_attn.o_proj.in" in where for where in unaligned["layers"]["first_difference_at"])
    assert all(rows == [] or min(rows) > 16 for rows in result["linears"]["float32"].values())
    [cost] = result["cost"]["float32"]
    assert cost["rows"] == 1 and cost["aligned_ms"] > 0 and cost["unaligned_ms"] > 0
    assert "requests identical to their solo run" in (tmp_path / "batch_invariance.md").read_text()

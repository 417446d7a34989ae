"""The contention benchmark's smoke mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serial  # it measures tokens/s quiet and under contention

REPO = Path(__file__).resolve().parents[2]


def test_contention_smoke_measures_each_variant_quiet_and_contended(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.contention", "--smoke", "--variants",
                           "adaptive,passive,1 thread", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "contention.json").read_text())["rows"]
    assert [(r["variant"], r["threads"]) for r in rows] == [("adaptive", 2), ("passive", 2), ("1 thread", 1)]
    assert rows[1]["env"]["OMP_WAIT_POLICY"] == "PASSIVE"
    for r in rows:
        assert r["quiet_tok_s"] > 0 and r["contended_tok_s"] > 0
        assert r["kept"] == r["contended_tok_s"] / r["quiet_tok_s"]
    md = (tmp_path / "contention.md").read_text()
    assert "| adaptive | 2 |" in md
    assert "`python -m benchmarks.contention --smoke --variants 'adaptive,passive,1 thread' --out " in md  # as run

"""The prefix-cache benchmark's smoke mode runs end to end, so the script cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_prefix_cache_smoke_reports_hits_and_unchanged_tokens(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.prefix_cache", "--smoke", "--threads", "1",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "prefix_cache.json").read_text())
    off, on = report["rows"]
    assert off["system"].endswith("off") and on["system"].endswith("on")
    assert off["hit_rate"] == 0 and off["prompt_tokens_computed"] == off["prompt_tokens"]
    assert report["meta"]["workload"]["system_prompt_tokens"] >= report["meta"]["plan"]["block_size"]
    # (how many requests hit depends on arrival timing: two prompts prefilled in one iteration both miss)
    assert 0 < on["hit_rate"] < 1 and on["prompt_tokens_computed"] < on["prompt_tokens"]
    assert on["exact_lengths"] and off["exact_lengths"]
    assert on["same_tokens_as_cache_off"] == on["requests"]
    table = (tmp_path / "prefix_cache.md").read_text()
    assert "| baton-pd, prefix cache on |" in table and "TTFT p99 s" in table

"""The HTTP load benchmark end to end on the session's Serve instance: both real deployments (BATON and plain
`@serve.batch` + `generate`) of the tiny random Llama serve every request over loopback HTTP with exactly its
length, and the report (markdown, JSON, PNG) is written from what was measured."""

from __future__ import annotations

import json

from benchmarks.http_load import LABELS, SMOKE, SYSTEMS, main
from benchmarks.models import tiny_llama
from benchmarks.workloads import anyscale


def test_http_load_smoke_both_deployments_exact(ray_serve: str, tmp_path) -> None:
    assert main(["--smoke", "--out", str(tmp_path)], base_url=ray_serve) == 0

    report = json.loads((tmp_path / "http_load.json").read_text())
    meta = report["meta"]
    assert meta["smoke"] and meta["model"] == "tiny" and meta["requests"] == SMOKE.requests
    vocab = tiny_llama().model.get_input_embeddings().num_embeddings
    work = anyscale(SMOKE.requests, vocab, SMOKE.seed, SMOKE.lengths)  # the same seeded requests, rebuilt here
    wanted = {r.request_id: r.max_tokens for r in work.requests}
    total = sum(wanted.values())
    assert meta["workload"]["summary"]["output_tokens"]["total"] == total
    assert list(report["systems"]) == list(SYSTEMS)
    for name, r in report["systems"].items():
        assert r["completed"] == SMOKE.requests and r["failed"] == 0 and not r["errors"], (name, r["errors"])
        assert r["inexact"] == [], (name, r["inexact"])
        got = {q["request_id"]: q["completion_tokens"] for q in r["requests"]}
        assert got == wanted, name  # every response returned exactly its max_tokens
        assert r["useful_tokens"] == total and r["tokens_per_s"] > 0 and r["wall_s"] > 0, name
        e2e = r["latency"]["e2e_s"]
        assert 0 < e2e["p50"] <= e2e["p90"] <= e2e["p99"], (name, e2e)
        assert r["latency"]["per_token_s"]["p50"] > 0
        assert r["other_cpu_cores"] >= 0 and r["own_cpu_cores"] > 0  # the noise meter ran
    baton, plain = report["systems"]["baton"], report["systems"]["plain"]
    assert plain["ratio_vs_plain"] == 1.0
    assert report["ratio_baton_over_plain"] == baton["tokens_per_s"] / plain["tokens_per_s"]
    # The replicas themselves report the configured threads, dtype and batch width.
    assert baton["replica"]["num_threads"] == SMOKE.threads and baton["replica"]["policy"] == "baton-pd"
    assert plain["replica"]["torch_threads"] == SMOKE.threads and plain["replica"]["dtype"] == "float32"
    assert sum(plain["replica"]["batch_sizes"]) == SMOKE.requests  # measured batches (warm-up left out)
    # BATON's streaming pass: every request streamed with its exact length and a time to first token.
    streaming = baton["streaming"]
    assert streaming["completed"] == SMOKE.requests and streaming["inexact"] == []
    assert 0 < streaming["latency"]["ttft_s"]["p50"] <= streaming["latency"]["e2e_s"]["p50"]

    table = (tmp_path / "http_load.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    for name in SYSTEMS:
        row = next((line for line in rows if line.startswith(f"| {LABELS[name]} |")), None)
        assert row is not None, (name, table)
        assert f"| {SMOKE.requests} | 0 | yes | {report['systems'][name]['tokens_per_s']:.1f} |" in row, row
    assert "Time to first token" in table and "## Fairness" in table
    png = tmp_path / "http_load.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

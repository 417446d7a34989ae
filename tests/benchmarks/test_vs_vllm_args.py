"""The vLLM peer runner's argument parsing and pure helpers (vLLM itself is never installed in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import vs_vllm
from benchmarks.peers import openai_load, vllm_env, vllm_server
from benchmarks.workloads import anyscale


def test_defaults_are_the_reference_run() -> None:
    plan, out, name, install_only = vs_vllm.parse_args([])
    assert plan.workloads == ("anyscale",) and plan.modes == ("offline", "http") and plan.dtypes == ("float32",)
    assert (plan.requests, plan.rows, plan.threads, plan.concurrency, plan.chat_requests) == (32, 16, 2, 16, 48)
    assert plan.kv_fraction == 0.3 and plan.vllm_spec == vllm_env.VLLM_SPEC and not install_only
    assert out == vs_vllm.RESULTS and name == "vs_vllm"


def test_lists_and_all() -> None:
    plan, *_ = vs_vllm.parse_args(["--workloads", "all", "--modes", "offline", "--dtypes", "bfloat16,float32",
                                     "--install-only"])
    assert plan.workloads == ("anyscale", "uniform", "poisson") and plan.modes == ("offline",)
    assert plan.dtypes == ("bfloat16", "float32")
    assert vs_vllm.parse_args(["--install-only"])[3]


@pytest.mark.parametrize("args", [["--modes", "gpu"], ["--dtypes", "float8"], ["--workloads", "anyscale,bursty"],
                                  ["--modes", ","]])
def test_unknown_names_are_refused(args: list[str]) -> None:
    with pytest.raises(SystemExit):
        vs_vllm.parse_args(args)


def test_reference_workload_lengths() -> None:
    plan, *_ = vs_vllm.parse_args([])
    (work,) = vs_vllm.make_workloads(plan, vocab=49152)
    assert len(work.requests) == 32
    assert all(16 <= len(r.prompt) <= 256 and 1 <= r.max_tokens <= 192 for r in work.requests)


def test_latency_and_same_outputs() -> None:
    timed = [vs_vllm.Timed(0.0, 1.0, 3.0, 5, 5, [1]), vs_vllm.Timed(1.0, 1.5, 1.5, 1, 1, [2])]
    lat = vs_vllm.latency(timed)
    assert lat["ttft_s"]["p50"] == pytest.approx(0.75) and lat["tpot_s"]["p50"] == pytest.approx(0.5)
    assert lat["e2e_s"]["p99"] == pytest.approx(0.5 + 2.5 * 0.99)
    assert vs_vllm.same_outputs({"a": [1, 2], "b": [3], "c": None}, {"a": [1, 2], "b": [4], "c": None}) == 1


def _row(system: str, tok: list[int], wall: float) -> dict:
    timed = {"r0": vs_vllm.Timed(0.0, 0.1, wall, len(tok), 3, tok)}
    return vs_vllm.summarize("offline", system, "anyscale", "float32", timed, wall, 10.0, 0.05)


def test_comparisons_and_markdown() -> None:
    rows = [_row(vs_vllm.OURS, [1, 2, 3], 2.0), _row(vs_vllm.VLLM, [1, 2, 3], 1.0)]
    vs_vllm.add_comparisons(rows)
    assert rows[0]["ratio_vs_vllm"] == pytest.approx(0.5) and rows[1]["ratio_vs_vllm"] == pytest.approx(1.0)
    assert rows[0]["same_output_as_vllm"] == 1 and rows[0]["exact"]
    plan, *_ = vs_vllm.parse_args([])
    report = {"meta": {"command": "c", "started": "s", "machine": "m", "plan": {"rows": 16}, "torch": "t",
                       "transformers": "tf", "vllm": "v", "vllm_torch": "vt", "fairness": ["f"],
                       "workloads": {"anyscale": {"description": "d"}}, "chat": {"requests": 0, "output_tokens": 0}},
              "rows": rows}
    text = vs_vllm.markdown(report)
    assert "## offline, float32" in text and "| anyscale | BATON engine (baton-pd) | 1.5 | 0.50x |" in text


def test_offline_spec_and_server_command(tmp_path: Path) -> None:
    plan, *_ = vs_vllm.parse_args(["--requests", "3"])
    work = anyscale(3, 1000, 0)
    spec = vs_vllm.vllm_offline_spec(plan, "bfloat16", tmp_path, [work])
    assert spec["dtype"] == "bfloat16" and spec["rows"] == 16 and spec["kv_fraction"] == 0.3
    (w,) = spec["workloads"]
    assert [r["id"] for r in w["requests"]] == ["req0", "req1", "req2"] and len(w["warmup"]) == 2
    server = vllm_server.ServerSpec(Path("/py"), tmp_path, "name", "float32", 16, 0.3, 2048)
    cmd = vllm_server.command(server, 8123)
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--max-num-seqs") + 1] == "16" and cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_chat_workload_is_seeded() -> None:
    a = openai_load.chat_workload(48, 0, vs_vllm.PEER_LENGTHS)
    assert a == openai_load.chat_workload(48, 0, vs_vllm.PEER_LENGTHS) and len({c.request_id for c in a}) == 48
    assert len({c.messages[0]["content"] for c in a}) == 48 and all(1 <= c.max_tokens <= 192 for c in a)


def test_main_job_flag() -> None:
    assert not vs_vllm.parse_args([])[0].main_job
    assert vs_vllm.parse_args(["--modes", "http", "--main-job"])[0].main_job


def test_no_workload_is_served_from_another_ones_prefix_cache() -> None:
    """vLLM's offline LLM keeps one engine (and its prefix cache) across workloads and warm-ups: poisson must not
    reuse anyscale's prompts, and no warm-up prompt may be a prefix of a measured one."""
    from benchmarks.compare import warmup_workload

    plan, *_ = vs_vllm.parse_args(["--workloads", "anyscale,poisson"])
    works = vs_vllm.make_workloads(plan, vocab=49152)
    prompts = [tuple(r.prompt) for w in works for r in w.requests]
    assert len(set(prompts)) == len(prompts)
    anyscale_prefixes = {p[:16] for p in (tuple(r.prompt) for r in works[0].requests)}
    assert not any(tuple(r.prompt)[:16] in anyscale_prefixes for r in works[1].requests)
    warm = [tuple(r.prompt) for w in works for r in warmup_workload(w).requests]
    assert not any(p[:len(w)] == w for w in warm for p in prompts)

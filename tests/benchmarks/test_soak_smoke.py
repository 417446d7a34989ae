"""The soak end to end on the session's Serve instance (tiny random Llama, two engine replicas): mixed
streams, unary calls, client disconnects and bad input, with one engine replica killed mid-run; nothing is
lost, hung or answered with other tokens than the undisturbed reference, no 5xx, every bad input is a 4xx, and
nothing stays in flight."""

from __future__ import annotations

import json

from benchmarks.soak import ANCHOR, KINDS, PROBLEMS, SMOKE, Outcome, Reference, bad_specs, judge, main


def test_soak_smoke_loses_nothing_across_a_replica_kill(ray_serve: str, tmp_path) -> None:
    assert main(["--smoke", "--out", str(tmp_path)], base_url=ray_serve) == 0

    report = json.loads((tmp_path / "soak.json").read_text())
    assert report["passed"] and report["meta"]["plan"]["model"] == "tiny"
    assert sum(report["kinds"][kind]["sent"] for kind in KINDS) == SMOKE.requests
    anchors = report["kinds"][ANCHOR]  # the long streams that the kill waited for: each whole and exact
    assert anchors["sent"] == anchors["ok"] == SMOKE.anchors > 0, anchors
    for kind in KINDS:  # every kind ran, and every request of it was fine
        k = report["kinds"][kind]
        assert k["sent"] > 0 and k["ok"] == k["sent"], (kind, k)
        assert all(k[p] == 0 for p in PROBLEMS), (kind, k)
    assert report["problems"] == dict.fromkeys(PROBLEMS, 0) and report["failures"] == []
    assert report["disconnected"] > 0  # clients really went away mid-stream
    for statuses in report["bad_input_status"].values():
        assert all(400 <= int(code) < 500 for code in statuses), report["bad_input_status"]
    # The kill came mid-run, and requests were continued on another replica.
    kill = report["kill"]
    assert kill["pid"] in kill["pids_before"] and 0 < kill["jobs_done_before"] < SMOKE.requests
    assert report["failovers"] > 0
    assert kill["at_s"] <= kill["anchors_started_s"] < kill["done_s"]  # the kill came after the anchors started
    assert len(kill["anchors_ended_after_kill_s"]) == SMOKE.anchors  # and every anchor outlived it
    end = report["end"]
    assert end["in_flight"] == 0 and end["survivors_answered"] and str(kill["pid"]) not in end["engine_rows"]
    assert end["engine_rows"] and not any(end["engine_rows"].values())
    assert 0 < report["latency_s"]["p50"] <= report["latency_s"]["p99"]
    table = (tmp_path / "soak.md").read_text()
    assert "**PASSED**" in table and f"| bad | {report['kinds']['bad']['sent']} |" in table


def test_bad_inputs_are_sent_as_valid_utf8() -> None:
    """A lone surrogate travels as the JSON escape \\ud800 (the body itself is valid UTF-8)."""
    for spec in bad_specs("t40 t41"):
        assert spec.raw is not None
        spec.raw.decode("utf-8")
    surrogate = next(s for s in bad_specs("t40") if s.key == "surrogate-prompt")
    assert b"\\ud800" in (surrogate.raw or b"")


def test_judge_counts_each_kind_of_failure() -> None:
    """The checks themselves: each way a request can go wrong is named (so the soak's zeros mean something)."""
    ref = Reference("t40 t41 t42", 3)

    def outcome(kind: str = "stream", **fields: object) -> Outcome:
        base = {"status": 200, "text": ref.text, "finish_reasons": ["length"], "completion_tokens": 3, "done": True}
        return Outcome(0, kind, "k", **{**base, **fields})  # type: ignore[arg-type]

    assert judge(outcome(), ref) == (None, "")
    assert judge(outcome("unary"), ref) == (None, "")
    assert judge(outcome(done=False), ref)[0] == "lost"  # no [DONE]
    assert judge(outcome(error_events=[{"message": "x"}]), ref)[0] == "lost"
    assert judge(outcome(status=429), ref)[0] == "lost"
    assert judge(outcome(exception="ReadError: x"), ref)[0] == "lost"
    assert judge(outcome(finish_reasons=["stop"]), ref)[0] == "lost"
    assert judge(outcome(hung=True), ref)[0] == "hung"
    assert judge(outcome(status=503), ref)[0] == "http_5xx"
    assert judge(outcome(text="t40 t41 t41 t42", completion_tokens=4), ref)[0] == "wrong_tokens"  # a repeat
    assert judge(outcome(text="t40 t42"), ref)[0] == "wrong_tokens"
    assert judge(outcome("disconnect", text="t40 t41", disconnected=True, done=False, finish_reasons=[]),
                 ref) == (None, "")
    assert judge(outcome("disconnect", text="t40 t40", disconnected=True), ref)[0] == "wrong_tokens"
    error = {"error": {"message": "bad", "type": "invalid_request_error"}}
    assert judge(outcome("bad", status=400, error_body=error), None) == (None, "")
    assert judge(outcome("bad", status=200, error_body=None), None)[0] == "bad_not_refused"
    assert judge(outcome("bad", status=400, error_body="plain text"), None)[0] == "bad_not_refused"
    assert judge(outcome("bad", status=500, error_body=error), None)[0] == "http_5xx"

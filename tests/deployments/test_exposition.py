"""Merging the nodes' Prometheus pages into GET /metrics."""

from __future__ import annotations

from deployments.exposition import merge_families

NODE_A = """# HELP ray_baton_num_requests_running Requests in the decode batch.
# TYPE ray_baton_num_requests_running gauge
ray_baton_num_requests_running{NodeAddress="10.0.0.1",replica="a"} 3.0
# HELP ray_other_metric Not ours.
# TYPE ray_other_metric gauge
ray_other_metric{x="1"} 7.0
# HELP ray_baton_time_to_first_token_seconds Time to first token.
# TYPE ray_baton_time_to_first_token_seconds histogram
ray_baton_time_to_first_token_seconds_bucket{le="0.1",replica="a"} 1.0
ray_baton_time_to_first_token_seconds_bucket{le="+Inf",replica="a"} 2.0
ray_baton_time_to_first_token_seconds_count{replica="a"} 2.0
ray_baton_time_to_first_token_seconds_sum{replica="a"} 0.3
"""
NODE_B = """# HELP ray_baton_num_requests_running Requests in the decode batch.
# TYPE ray_baton_num_requests_running gauge
ray_baton_num_requests_running{NodeAddress="10.0.0.2",replica="b"} 1.0
"""


def test_families_are_merged_across_nodes_with_their_comments_once() -> None:
    lines = merge_families([NODE_A, NODE_B]).splitlines()
    assert lines[:4] == [
        "# HELP ray_baton_num_requests_running Requests in the decode batch.",
        "# TYPE ray_baton_num_requests_running gauge",
        'ray_baton_num_requests_running{NodeAddress="10.0.0.1",replica="a"} 3.0',
        'ray_baton_num_requests_running{NodeAddress="10.0.0.2",replica="b"} 1.0',
    ]
    assert not any("ray_other_metric" in line for line in lines)
    assert sum(line.startswith("ray_baton_time_to_first_token_seconds_") for line in lines) == 4
    assert sum(line.startswith("# TYPE") for line in lines) == 2


def test_no_pages_is_an_empty_page() -> None:
    assert merge_families([]) == ""

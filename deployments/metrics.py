"""What a replica reports: Prometheus metrics, and the signals its autoscaling policy scales on.

Metric names follow vLLM's (`vllm:num_requests_running` -> `baton_num_requests_running`, ...) where vLLM has
one; `baton_batch_capacity`, `baton_idle_computation_fraction` and `baton_memory_used_fraction` (the memory
budget's, which the capacity controller and the replica autoscaler act on) are BATON's own. Ray's OpenTelemetry
exporter silently drops names containing ':', hence '_'. `ray.serve.metrics` adds the deployment / replica /
application tags; Ray exports every metric with a `ray_` prefix, and counters with a `_total` suffix
(`ray_baton_num_preemptions_total`, like `vllm:num_preemptions_total`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from ray.serve.metrics import Counter, Gauge, Histogram

from autoscaler.serve_policy import (
    STAT_CAPACITY,
    STAT_MAX_BATCH,
    STAT_MEMORY,
    STAT_PREEMPTION_RATE,
    STAT_RUNNING,
    STAT_SWAPPED,
    STAT_TTFT,
    STAT_WAITING,
)

# Engine gauges copied as they are: metric name -> key of `AsyncBatonEngine.metrics()`.
_GAUGES = {
    "baton_num_requests_running": ("num_requests_running", "Requests in the decode batch."),
    "baton_num_requests_waiting": ("num_requests_waiting", "Requests waiting for a row (incl. prefilled)."),
    "baton_num_requests_swapped": ("num_requests_swapped", "Preempted requests whose KV is on the host."),
    "baton_kv_cache_usage_perc": (
        "kv_cache_usage",
        "KV-cache usage (0..1, like vLLM's): tokens the rows hold over the preallocated cache's capacity.",
    ),
    "baton_memory_used_fraction": (
        "memory_used_fraction",
        "Fraction of the memory budget in use (0..1) as the memory probe reads it, weights and everything "
        "else included; 0 without a probe (the fixed controller).",
    ),
    "baton_batch_capacity": ("capacity", "Rows the capacity controller allows in the next step."),
    "baton_max_batch_size": ("max_batch_size", "Configured most rows of the decode batch."),
    "baton_idle_computation_fraction": (
        "idle_fraction",
        "Token slots computed that produced nothing useful.",
    ),
    "baton_prefix_cache_bytes": ("prefix_cache_bytes", "Device bytes the prefix cache holds (evicted first)."),
    "baton_decode_threads": (
        "decode_threads",
        "CPU threads the decode steps use now (the thread tuner's choice; engine/thread_tuner.py).",
    ),
}
# Engine totals exported as counters (incremented by the change since the last poll).
_COUNTERS = {
    "baton_num_preemptions": ("preemptions_total", "Preemptions (swap or recompute)."),
    "baton_prompt_tokens": ("prompt_tokens_total", "Prompt tokens accepted."),
    "baton_generation_tokens": ("generated_tokens_total", "Tokens generated."),
    "baton_admissions_refused_for_memory": (
        "admissions_refused_for_memory",
        "Admissions the controller refused.",
    ),
    # Mean decode rows = decode_rows / iterations; share of the loop's time inside the model = forward / iteration.
    "baton_iterations": ("iterations", "Engine iterations (steps)."),
    "baton_thread_switches": ("thread_switches_total", "Times the thread tuner changed the decode steps' threads."),
    "baton_decode_rows": ("decode_rows_total", "Rows computed by decode forwards, summed over iterations."),
    "baton_forward_seconds": ("forward_seconds_total", "Seconds inside model forward passes."),
    "baton_iteration_seconds": ("iteration_seconds_total", "Seconds of engine iterations (forwards included)."),
    # The CPU kernels' work-sharing pool: the compute thread's seconds in its jobs, and of those waiting for chunks a
    # helper thread had taken (a helper that lost its core mid-chunk shows here).
    "baton_share_job_seconds": ("share_job_seconds_total", "Seconds the compute thread spent in work-sharing jobs."),
    "baton_share_wait_seconds": (
        "share_wait_seconds_total",
        "Of those, seconds waiting for chunks a helper thread had taken.",
    ),
    # Hit rate = hits / queries (vLLM: prefix_cache_hits / prefix_cache_queries, in tokens).
    "baton_prefix_cache_hit_tokens": (
        "prefix_cache_hit_tokens_total",
        "Prompt tokens whose KV came from the prefix cache (not computed).",
    ),
    "baton_prefix_cache_query_tokens": (
        "prefix_cache_query_tokens_total",
        "Prompt tokens of the prefills that asked the prefix cache.",
    ),
}
_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_TPOT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5]


class ServerMetrics:
    """The Prometheus metrics of one replica."""

    def __init__(self, model_name: str) -> None:
        tags = {"model_name": model_name}
        self._gauges = {key: _gauge(name, desc, tags) for name, (key, desc) in _GAUGES.items()}
        self._counters = {key: _counter(name, desc, tags) for name, (key, desc) in _COUNTERS.items()}
        self._last_totals: dict[str, float] = {}
        self.ttft = _histogram(
            "baton_time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS, tags
        )
        self.tpot = _histogram(
            "baton_time_per_output_token_seconds",
            "Time per output token after the first.",
            _TPOT_BUCKETS,
            tags,
        )
        self.e2e = _histogram("baton_e2e_request_latency_seconds", "Request latency.", _LATENCY_BUCKETS, tags)
        self.success = Counter(
            "baton_request_success",
            description="Finished requests by finish reason.",
            tag_keys=("model_name", "finished_reason"),  # type: ignore[arg-type]  # Ray annotates tuple[str]
        )
        self.success.set_default_tags(dict(tags))

    def observe_engine(self, engine_metrics: Mapping[str, float]) -> None:
        for key, gauge in self._gauges.items():
            if key in engine_metrics:
                gauge.set(float(engine_metrics[key]))
        for key, counter in self._counters.items():
            if key not in engine_metrics:
                continue
            total = float(engine_metrics[key])
            delta = total - self._last_totals.get(key, 0.0)
            self._last_totals[key] = total
            if delta > 0:
                counter.inc(delta)

    def observe_request(
        self, ttft_s: float | None, tpot_s: float | None, e2e_s: float, finish_reason: str
    ) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        self.e2e.observe(e2e_s)
        self.success.inc(1.0, tags={"finished_reason": finish_reason})


def _gauge(name: str, description: str, tags: dict[str, str]) -> Gauge:
    g = Gauge(name, description=description, tag_keys=("model_name",))
    g.set_default_tags(dict(tags))  # Serve adds its tags to the dict it is given
    return g


def _counter(name: str, description: str, tags: dict[str, str]) -> Counter:
    c = Counter(name, description=description, tag_keys=("model_name",))
    c.set_default_tags(dict(tags))
    return c


def _histogram(name: str, description: str, buckets: list[float], tags: dict[str, str]) -> Histogram:
    h = Histogram(name, description=description, boundaries=buckets, tag_keys=("model_name",))
    h.set_default_tags(dict(tags))
    return h


class AutoscalingSignals:
    """Turns engine metrics and per-request TTFTs into the replica's `record_autoscaling_stats()` dict.

    Rates are over the time since the previous report; the TTFT is the mean of first tokens seen since
    then (0 when none, i.e. no new load). Thread-safe: TTFTs arrive from request handlers.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ttfts: list[float] = []
        self._last_time: float | None = None
        self._last_preemptions = 0.0

    def observe_ttft(self, ttft_s: float) -> None:
        with self._lock:
            self._ttfts.append(ttft_s)

    def report(self, engine_metrics: Mapping[str, float]) -> dict[str, float]:
        now = self._clock()
        preemptions = float(engine_metrics.get("preemptions_total", 0.0))
        with self._lock:
            ttfts, self._ttfts = self._ttfts, []
            elapsed = None if self._last_time is None else now - self._last_time
            rate = (preemptions - self._last_preemptions) / elapsed if elapsed else 0.0
            self._last_time, self._last_preemptions = now, preemptions
        return {
            STAT_RUNNING: float(engine_metrics.get("num_requests_running", 0.0)),
            STAT_WAITING: float(engine_metrics.get("num_requests_waiting", 0.0)),
            STAT_SWAPPED: float(engine_metrics.get("num_requests_swapped", 0.0)),
            STAT_CAPACITY: float(engine_metrics.get("capacity", 0.0)),
            STAT_MAX_BATCH: float(engine_metrics.get("max_batch_size", 0.0)),
            STAT_MEMORY: float(engine_metrics.get("memory_used_fraction", 0.0)),
            STAT_PREEMPTION_RATE: max(0.0, rate),
            STAT_TTFT: sum(ttfts) / len(ttfts) if ttfts else 0.0,
        }


class MetricsPoller:
    """A daemon thread that copies the engine's gauges into `ServerMetrics` every `interval_s`."""

    def __init__(
        self, read: Callable[[], Mapping[str, float]], metrics: ServerMetrics, interval_s: float
    ) -> None:
        self._read = read
        self._metrics = metrics
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="baton-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self._interval_s + 1)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._metrics.observe_engine(self._read())

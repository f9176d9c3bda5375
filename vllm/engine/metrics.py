"""Stat loggers: Prometheus metrics with upstream vLLM's ``vllm:`` names, and a periodic log line.

Both take what ``LLMEngine`` reports through ``StatLoggerBase.record``.
"""

from __future__ import annotations

import time

import prometheus_client as prom

from vllm.engine.metrics_types import IterationStats, SchedulerStats
from vllm.logger import init_logger

logger = init_logger(__name__)

_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0]  # fmt: skip
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
_TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                  100000]  # fmt: skip
_FINISH_REASONS = ("stop", "length", "abort")


class PrometheusStatLogger:
    """Engine metrics in ``registry`` (a server's own, so two servers in one process or a
    test never share counters), every series labelled with ``model_name``."""

    def __init__(self, registry: prom.CollectorRegistry, model_name: str) -> None:
        labels = {"model_name": model_name}

        def gauge(name: str, doc: str) -> prom.Gauge:
            return prom.Gauge(name, doc, list(labels), registry=registry).labels(**labels)

        def counter(name: str, doc: str) -> prom.Counter:
            return prom.Counter(name, doc, list(labels), registry=registry).labels(**labels)

        def histogram(name: str, doc: str, buckets: list[float]) -> prom.Histogram:
            return prom.Histogram(
                name, doc, list(labels), buckets=buckets, registry=registry
            ).labels(**labels)

        self.num_requests_running = gauge(
            "vllm:num_requests_running", "Number of requests in the running batch."
        )
        self.num_requests_waiting = gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be scheduled."
        )
        self.kv_cache_usage = gauge(
            "vllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full)."
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in prompt tokens looked up (admitted sequences).",
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in prompt tokens found cached."
        )
        self._prefix_cache_totals = (0, 0)  # (queries, hits) already counted
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prompt tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        success = prom.Counter(
            "vllm:request_success",
            "Number of finished requests, by finish reason.",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self.request_success = {
            r: success.labels(**labels, finished_reason=r) for r in _FINISH_REASONS
        }
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token.",
            _TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds",
            "Seconds between consecutive tokens of a request.",
            _ITL_BUCKETS,
        )
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens of each finished request.", _TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens",
            "Generated tokens of each finished request (over its n sequences).",
            _TOKEN_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "Seconds from a request's arrival to its end.",
            _E2E_BUCKETS,
        )

    def record(
        self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None
    ) -> None:
        self.num_requests_running.set(scheduler_stats.num_running_reqs)
        self.num_requests_waiting.set(scheduler_stats.num_waiting_reqs)
        self.kv_cache_usage.set(scheduler_stats.kv_cache_usage)
        queries, hits = scheduler_stats.prefix_cache_queries, scheduler_stats.prefix_cache_hits
        counted_queries, counted_hits = self._prefix_cache_totals
        self.prefix_cache_queries.inc(queries - counted_queries)
        self.prefix_cache_hits.inc(hits - counted_hits)
        self._prefix_cache_totals = (queries, hits)
        if iteration_stats is None:
            return
        self.prompt_tokens.inc(iteration_stats.num_prompt_tokens)
        self.generation_tokens.inc(iteration_stats.num_generation_tokens)
        for ttft in iteration_stats.time_to_first_tokens:
            self.time_to_first_token.observe(ttft)
        for itl in iteration_stats.inter_token_latencies:
            self.inter_token_latency.observe(itl)
        for finished in iteration_stats.finished_requests:
            self.request_success[finished.finish_reason].inc()
            self.e2e_request_latency.observe(finished.e2e_latency)
            self.request_prompt_tokens.observe(finished.num_prompt_tokens)
            self.request_generation_tokens.observe(finished.num_generation_tokens)


class LoggingStatLogger:
    """Logs throughput, queue and cache usage at most every ``interval`` seconds of activity."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last_log = time.monotonic()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._prefix_cache_totals = (0, 0)  # (queries, hits) at the last log line

    def record(
        self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None
    ) -> None:
        if iteration_stats is not None:
            self._prompt_tokens += iteration_stats.num_prompt_tokens
            self._generation_tokens += iteration_stats.num_generation_tokens
        now = time.monotonic()
        elapsed = now - self._last_log
        if elapsed < self.interval:
            return
        queries = scheduler_stats.prefix_cache_queries - self._prefix_cache_totals[0]
        hits = scheduler_stats.prefix_cache_hits - self._prefix_cache_totals[1]
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%",
            self._prompt_tokens / elapsed,
            self._generation_tokens / elapsed,
            scheduler_stats.num_running_reqs,
            scheduler_stats.num_waiting_reqs,
            scheduler_stats.kv_cache_usage * 100,
            100 * hits / queries if queries else 0.0,
        )
        self._prefix_cache_totals = (
            scheduler_stats.prefix_cache_queries,
            scheduler_stats.prefix_cache_hits,
        )
        self._last_log = now
        self._prompt_tokens = self._generation_tokens = 0

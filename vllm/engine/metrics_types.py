"""What the engine reports after each step, for stat loggers (Prometheus, the log).

Pure Python: the engine fills these whether or not ``prometheus_client`` is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class SchedulerStats:
    """The engine's state right now."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    # Fraction of KV cache blocks in use, 0-1.
    kv_cache_usage: float = 0.0
    # Since the engine started: tokens of admitted sequences looked up in the prefix
    # cache, and how many of them it held.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


@dataclass
class FinishedRequestStats:
    finish_reason: str
    e2e_latency: float
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass
class RequestStateStats:
    """Timing of one request, kept by the engine while it runs (monotonic seconds)."""

    arrival_time: float
    num_prompt_tokens: int
    # When the last step that gave this request tokens ended (None before the first).
    last_token_time: float | None = None
    num_generation_tokens: int = 0  # over all its sequences


@dataclass
class IterationStats:
    """What one engine step did. Latencies are in seconds."""

    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    # One entry per request that got its first token this step.
    time_to_first_tokens: list[float] = field(default_factory=list)
    # One entry per request that got a later token this step: the time since its last one.
    inter_token_latencies: list[float] = field(default_factory=list)
    finished_requests: list[FinishedRequestStats] = field(default_factory=list)

    def update_from_output(
        self, req: RequestStateStats, num_output_tokens: int, now: float
    ) -> None:
        """A step gave ``req`` tokens; it now has ``num_output_tokens`` over its sequences."""
        new_tokens = num_output_tokens - req.num_generation_tokens
        req.num_generation_tokens = num_output_tokens
        self.num_generation_tokens += new_tokens
        if req.last_token_time is None:
            self.num_prompt_tokens += req.num_prompt_tokens
            self.time_to_first_tokens.append(now - req.arrival_time)
        else:
            self.inter_token_latencies.append(now - req.last_token_time)
        req.last_token_time = now

    def update_from_finished(self, req: RequestStateStats, finish_reason: str, now: float) -> None:
        self.finished_requests.append(
            FinishedRequestStats(
                finish_reason=finish_reason,
                e2e_latency=now - req.arrival_time,
                num_prompt_tokens=req.num_prompt_tokens,
                num_generation_tokens=req.num_generation_tokens,
            )
        )


class StatLoggerBase(Protocol):
    def record(
        self, scheduler_stats: SchedulerStats, iteration_stats: IterationStats | None
    ) -> None:
        """Called after every step (with that step's stats) and after requests are added or
        aborted (``iteration_stats`` None)."""
        ...

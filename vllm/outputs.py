"""What ``LLM.generate`` returns, with upstream vLLM's field names."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """A token's logprob under the model, its 1-based rank there, and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per token: that token and the top-k asked for, each with its Logprob.
SampleLogprobs = list[dict[int, Logprob]]
# As above for each prompt token; the first has no context to be scored in, so None.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.time()``) of one request, as upstream vLLM reports them."""

    arrival_time: float
    last_token_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    time_in_queue: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None
    metrics: RequestMetrics | None = None
    # Prompt tokens whose KV came from cached blocks instead of being computed.
    num_cached_tokens: int | None = None

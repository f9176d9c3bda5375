"""Engine-side request state. Pure Python: the scheduler imports this, never torch."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.outputs import Logprob
    from vllm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISHED = {
    SequenceStatus.FINISHED_STOPPED,
    SequenceStatus.FINISHED_LENGTH_CAPPED,
    SequenceStatus.FINISHED_ABORTED,
}
_FINISH_REASON = {
    SequenceStatus.FINISHED_STOPPED: "stop",
    SequenceStatus.FINISHED_LENGTH_CAPPED: "length",
    SequenceStatus.FINISHED_ABORTED: "abort",
}


class Sequence:
    """One generated continuation. A request with ``n`` > 1 owns ``n`` sequences.

    ``token_ids`` holds prompt then output tokens; ``num_computed_tokens`` counts
    the leading tokens whose keys/values are already in the paged KV cache.
    """

    def __init__(
        self,
        seq_id: int,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
        index: int = 0,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.index = index  # position among the request's n outputs
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        # Prefix-cache names of the full blocks of token_ids so far (the block manager's).
        self.block_hashes: list[bytes] = []
        # Tokens sampled since the workers last saw this sequence (sent with the next step).
        self.pending_token_ids: list[int] = []
        # Set when the workers hold state for this sequence (cleared on preemption).
        self.in_worker = False
        self.num_preemptions = 0
        # Output bookkeeping (filled by the engine's output processor).
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, Logprob]] | None = (
            [] if sampling_params.logprobs is not None else None
        )
        self.output_text = ""
        self.stop_reason: int | str | None = None
        # How much of the output earlier outputs carried (RequestOutputKind.DELTA).
        self.num_sent_tokens = 0
        self.num_sent_chars = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.pending_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Sequence(seq_id={self.seq_id}, request_id={self.request_id!r}, "
            f"status={self.status.name}, len={len(self)}, computed={self.num_computed_tokens})"
        )


@dataclass
class NewSeqData:
    """A sequence the workers have not seen (or must rebuild after a preemption)."""

    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    # Leading tokens whose KV is already cached (non-zero when blocks are shared).
    num_computed_tokens: int
    block_ids: list[int]
    sampling_params: SamplingParams


@dataclass
class CachedSeqData:
    """Delta for a sequence the workers already hold."""

    seq_id: int
    new_token_ids: list[int]
    new_block_ids: list[int]


@dataclass
class SchedulerOutput:
    """What the workers run in one step. Order of ``num_scheduled_tokens`` is batch order."""

    new_seqs: list[NewSeqData] = field(default_factory=list)
    cached_seqs: list[CachedSeqData] = field(default_factory=list)
    # seq_id -> number of tokens to run this step, in batch order.
    num_scheduled_tokens: dict[int, int] = field(default_factory=dict)
    # Sequences whose worker-side state must be dropped (finished or preempted).
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


# token_id -> (logprob, 1-based rank in the model's distribution): the top-k asked for,
# best first, plus the token actually sampled or found in the prompt.
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float
    # Set when the request asked for logprobs (k >= 0).
    top_logprobs: TokenLogprobs | None = None


@dataclass
class PromptLogprobsChunk:
    """Prompt logprobs of one sequence for the prompt tokens at positions ``start``,
    ``start + 1``, ... (each scored given the tokens before it; position 0 has none)."""

    seq_id: int
    start: int
    logprobs: list[TokenLogprobs]


@dataclass
class ModelRunnerOutput:
    """What rank 0 returns after a step: one entry per sequence that sampled."""

    sampled: list[SampledToken] = field(default_factory=list)
    # For sequences whose request asked for prompt_logprobs and whose prompt ran this step.
    prompt_logprobs: list[PromptLogprobsChunk] = field(default_factory=list)

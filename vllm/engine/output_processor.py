"""From worker results to ``RequestOutput``s: logprobs, stop conditions, text, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.core.scheduler import Scheduler
from vllm.engine.detokenizer import Detokenizer
from vllm.engine.metrics_types import RequestStateStats
from vllm.outputs import CompletionOutput, PromptLogprobs, RequestMetrics, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams
from vllm.sequence import PromptLogprobsChunk, SampledToken, Sequence, SequenceStatus


@dataclass
class RequestState:
    """The engine's record of one request while it runs."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    params: SamplingParams
    stats: RequestStateStats  # monotonic, for stat loggers
    metrics: RequestMetrics  # wall-clock, for RequestOutput.metrics
    # One entry per prompt token once scored (the first is always None), if asked for.
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int | None = None
    prompt_logprobs_sent: bool = False


class OutputProcessor:
    """Applies what a step sampled to the engine's sequences and builds the outputs."""

    def __init__(self, detokenizer: Detokenizer, scheduler: Scheduler, max_model_len: int):
        self.detokenizer = detokenizer
        self.scheduler = scheduler
        self.max_model_len = max_model_len

    def process_prompt_logprobs(self, req: RequestState, chunk: PromptLogprobsChunk) -> None:
        """Keep the scores of prompt tokens not yet scored (a preempted or forked
        sequence may score some twice)."""
        if req.prompt_logprobs is None:
            return
        detokenize = req.params.detokenize
        for position, scored in enumerate(chunk.logprobs, start=chunk.start):
            if req.prompt_logprobs[position] is None:
                req.prompt_logprobs[position] = self.detokenizer.logprobs(scored, detokenize)

    def process_token(self, seq: Sequence, sampled: SampledToken) -> None:
        params = seq.sampling_params
        seq.cumulative_logprob += sampled.logprob
        if seq.logprobs is not None and sampled.top_logprobs is not None:
            seq.logprobs.append(self.detokenizer.logprobs(sampled.top_logprobs, params.detokenize))
        token = sampled.token_id
        num_out = seq.num_output_tokens
        status = None
        if token in params.all_stop_token_ids and num_out >= params.min_tokens:
            status = SequenceStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                seq.stop_reason = token
        elif params.stop:
            # Like stop tokens, stop strings count only in text after the first min_tokens.
            stop_str = self.detokenizer.check_stop_strings(seq, num_out > params.min_tokens)
            if stop_str is not None:
                status = SequenceStatus.FINISHED_STOPPED
                seq.stop_reason = stop_str
        elif params.output_kind is not RequestOutputKind.FINAL_ONLY:
            self.detokenizer.decode(seq)  # text is sent every step
        if status is None and (
            (params.max_tokens is not None and num_out >= params.max_tokens)
            or len(seq) >= self.max_model_len
        ):
            status = SequenceStatus.FINISHED_LENGTH_CAPPED
        if status is not None:
            self.scheduler.finish_seq(seq, status)
            self.detokenizer.finalize(seq)

    def make_output(self, req: RequestState, finished: bool) -> RequestOutput:
        delta = req.params.output_kind is RequestOutputKind.DELTA
        completions = []
        for seq in req.seqs:
            text = seq.output_text if seq.is_finished else self.detokenizer.streamable_text(seq)
            token_ids = seq.output_token_ids
            logprobs = seq.logprobs
            if delta:
                text = text[seq.num_sent_chars :]
                seq.num_sent_chars += len(text)
                token_ids = token_ids[seq.num_sent_tokens :]
                if not token_ids:
                    continue  # nothing new (its last output, with any finish, was sent)
                if logprobs is not None:
                    logprobs = logprobs[seq.num_sent_tokens :]
                seq.num_sent_tokens += len(token_ids)
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=token_ids,
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=logprobs,
                    finish_reason=seq.status.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        prompt_logprobs = req.prompt_logprobs
        if delta and req.prompt_logprobs_sent:
            prompt_logprobs = None  # sent with the request's first output
        req.prompt_logprobs_sent = True
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            completions,
            finished,
            prompt_logprobs=prompt_logprobs,
            metrics=req.metrics,
            num_cached_tokens=req.num_cached_tokens,
        )

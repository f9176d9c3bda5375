"""Turns a SchedulerOutput into model inputs, runs the model, samples on rank 0."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm.attention.backend import build_attention_metadata
from vllm.attention.layer import set_attn_metadata
from vllm.config import VllmConfig
from vllm.model_executor.layers.sampler import (
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    compute_prompt_logprobs,
)
from vllm.model_executor.model_loader import get_model, get_model_loader
from vllm.sampling_params import SamplingParams, SamplingType
from vllm.sequence import (
    ModelRunnerOutput,
    PromptLogprobsChunk,
    SampledToken,
    SchedulerOutput,
    TokenLogprobs,
)


@dataclass(slots=True)
class SeqState:
    """What a worker keeps per sequence between steps."""

    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None


class ModelRunner:
    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_driver: bool):
        self.vllm_config = vllm_config
        self.device = device
        self.is_driver = is_driver  # rank 0 samples and returns tokens
        self.block_size = vllm_config.cache_config.block_size
        self.vocab_size = vllm_config.model_config.vocab_size
        self.model: nn.Module | None = None
        self.bytes_read = 0  # checkpoint bytes read by load_model
        self.sampler = Sampler()
        self.seqs: dict[int, SeqState] = {}

    def load_model(self) -> None:
        loader = get_model_loader(self.vllm_config.load_config)
        self.model = get_model(self.vllm_config, loader)
        self.bytes_read = loader.bytes_read

    def _update_states(self, so: SchedulerOutput) -> None:
        for seq_id in so.finished_seq_ids:
            self.seqs.pop(seq_id, None)
        for new in so.new_seqs:
            sp = new.sampling_params
            gen = None
            if sp.sampling_type == SamplingType.RANDOM_SEED:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(sp.seed)
                # A sequence resumed after preemption brings its outputs so far: replay the
                # draws they used (one per token) so its random stream goes on unchanged.
                for _ in range(len(new.token_ids) - new.num_prompt_tokens):
                    q = torch.empty(self.vocab_size, dtype=torch.float32, device=self.device)
                    q.exponential_(generator=gen)
            self.seqs[new.seq_id] = SeqState(
                list(new.token_ids),
                new.num_prompt_tokens,
                new.num_computed_tokens,
                list(new.block_ids),
                sp,
                gen,
            )
        for cached in so.cached_seqs:
            state = self.seqs[cached.seq_id]
            state.token_ids.extend(cached.new_token_ids)
            state.block_ids.extend(cached.new_block_ids)

    @torch.inference_mode()
    def execute_model(self, so: SchedulerOutput) -> ModelRunnerOutput | None:
        self._update_states(so)
        input_ids: list[int] = []
        positions: list[int] = []
        attn_seqs = []
        sample_idx: list[int] = []
        sample_seq_ids: list[int] = []
        prompt_rows = _PromptRows()
        for seq_id, n in so.num_scheduled_tokens.items():
            state = self.seqs[seq_id]
            start = state.num_computed_tokens
            if state.sampling_params.prompt_logprobs is not None:
                prompt_rows.add(seq_id, state, len(input_ids), start, n)
            input_ids.extend(state.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            attn_seqs.append((state.block_ids, start, n))
            state.num_computed_tokens += n
            if state.num_computed_tokens == len(state.token_ids):
                sample_idx.append(len(input_ids) - 1)
                sample_seq_ids.append(seq_id)
        if not input_ids:
            return ModelRunnerOutput() if self.is_driver else None
        meta = build_attention_metadata(attn_seqs, self.block_size, self.device)
        set_attn_metadata(meta)
        try:
            hidden = self.model(
                torch.tensor(input_ids, device=self.device),
                torch.tensor(positions, device=self.device),
            )
        finally:
            set_attn_metadata(None)
        if not sample_idx and not prompt_rows.rows:
            return ModelRunnerOutput() if self.is_driver else None
        # Every rank takes part in the logits all-gather; only the driver samples.
        rows = torch.tensor(sample_idx + prompt_rows.rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])
        if not self.is_driver:
            return None
        num_sampled = len(sample_idx)
        output = ModelRunnerOutput()
        if prompt_rows.rows:
            output.prompt_logprobs = prompt_rows.score(logits[num_sampled:], self.device)
        if num_sampled:
            states = [self.seqs[i] for i in sample_seq_ids]
            out = self.sampler(logits[:num_sampled], self._sampling_metadata(states))
            output.sampled = _sampled_tokens(out, sample_seq_ids, states)
        return output

    def _sampling_metadata(self, states: list[SeqState]) -> SamplingMetadata:
        params = [s.sampling_params for s in states]
        dev = self.device

        def column(values: list[float], neutral: float) -> torch.Tensor | None:
            if all(v == neutral for v in values):
                return None
            return torch.tensor(values, dtype=torch.float32, device=dev)

        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        temperature = [1.0 if g else p.temperature for g, p in zip(greedy, params)]
        presence = column([p.presence_penalty for p in params], 0.0)
        frequency = column([p.frequency_penalty for p in params], 0.0)
        repetition = column([p.repetition_penalty for p in params], 1.0)
        output_counts = prompt_mask = None
        if presence is not None or frequency is not None or repetition is not None:
            output_counts = torch.zeros(len(states), self.vocab_size, device=dev)
            prompt_mask = torch.zeros(len(states), self.vocab_size, dtype=torch.bool, device=dev)
            for row, s in enumerate(states):
                out_ids = torch.tensor(s.token_ids[s.num_prompt_tokens :], dtype=torch.long)
                output_counts[row].index_add_(
                    0, out_ids.to(dev), torch.ones(len(out_ids), device=dev)
                )
                prompt_mask[row, torch.tensor(s.token_ids[: s.num_prompt_tokens]).to(dev)] = True
        banned = [
            (row, sorted(s.sampling_params.all_stop_token_ids))
            for row, s in enumerate(states)
            if s.sampling_params.all_stop_token_ids
            and len(s.token_ids) - s.num_prompt_tokens < s.sampling_params.min_tokens
        ]
        top_k = [p.top_k for p in params]
        return SamplingMetadata(
            all_greedy=all(greedy),
            temperature=torch.tensor(temperature, dtype=torch.float32, device=dev),
            greedy_mask=torch.tensor(greedy, device=dev),
            top_p=column([p.top_p for p in params], 1.0),
            top_k=None if not any(top_k) else torch.tensor(top_k, device=dev),
            min_p=column([p.min_p for p in params], 0.0),
            generators={row: s.generator for row, s in enumerate(states) if s.generator},
            output_counts=output_counts,
            prompt_mask=prompt_mask,
            presence_penalty=presence,
            frequency_penalty=frequency,
            repetition_penalty=repetition,
            banned_tokens=banned,
            max_num_logprobs=max((p.logprobs or 0) for p in params),
            need_ranks=any(p.logprobs is not None for p in params),
        )


def _sampled_tokens(
    out: SamplerOutput, seq_ids: list[int], states: list[SeqState]
) -> list[SampledToken]:
    token_ids = out.token_ids.tolist()
    logprobs = out.logprobs.tolist()
    ranks = out.ranks.tolist() if out.ranks is not None else None
    top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    sampled = []
    for i, (seq_id, state) in enumerate(zip(seq_ids, states)):
        top = None
        k = state.sampling_params.logprobs
        if k is not None:
            top = _top_logprobs(top_ids[i][:k], top_lps[i][:k]) if k else {}
            top[token_ids[i]] = (logprobs[i], ranks[i])
        sampled.append(SampledToken(seq_id, token_ids[i], logprobs[i], top))
    return sampled


def _top_logprobs(token_ids: list[int], logprobs: list[float]) -> TokenLogprobs:
    """The top-k as token -> (logprob, rank), best first."""
    return {t: (lp, rank) for rank, (t, lp) in enumerate(zip(token_ids, logprobs), start=1)}


class _PromptRows:
    """The batch rows whose logits score prompt tokens, for requests with prompt_logprobs.

    The row of position j scores the prompt token at j + 1; a chunk of positions
    [start, start + n) scores prompt tokens start + 1 ... up to the prompt's last.
    """

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.targets: list[int] = []
        self.chunks: list[tuple[int, int, int, int]] = []  # (seq_id, first token, count, k)

    def add(self, seq_id: int, state: SeqState, first_row: int, start: int, n: int) -> None:
        end = min(start + n, state.num_prompt_tokens - 1)  # positions start .. end - 1
        if end <= start:
            return
        self.rows.extend(range(first_row, first_row + end - start))
        self.targets.extend(state.token_ids[start + 1 : end + 1])
        k = state.sampling_params.prompt_logprobs
        self.chunks.append((seq_id, start + 1, end - start, k))

    def score(self, logits: torch.Tensor, device: torch.device) -> list[PromptLogprobsChunk]:
        num_top = max(k for *_, k in self.chunks)
        out = compute_prompt_logprobs(logits, torch.tensor(self.targets, device=device), num_top)
        logprobs, ranks = out.logprobs.tolist(), out.ranks.tolist()
        top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        chunks, row = [], 0
        for seq_id, first, count, k in self.chunks:
            scored = []
            for i in range(row, row + count):
                top = _top_logprobs(top_ids[i][:k], top_lps[i][:k]) if k else {}
                top[self.targets[i]] = (logprobs[i], ranks[i])
                scored.append(top)
            chunks.append(PromptLogprobsChunk(seq_id, first, scored))
            row += count
        return chunks
